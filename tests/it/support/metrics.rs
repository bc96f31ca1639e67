//! promtool, which checks exposition text and rule files.

/// Runs `promtool args` with `stdin` on its standard input; its output is the failure message.
pub fn promtool(args: &[&str], stdin: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `promtool check metrics` (lint included) accepts `text`, a classic-format exposition.
pub fn assert_promtool_passes(text: &str) {
    promtool(&["check", "metrics"], text);
}
