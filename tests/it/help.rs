//! The operator's own documentation in both binaries: `--help` describes every option and
//! argument of every subcommand; shell completions and the man page are generated from the
//! same definitions.

use crate::support::temp_file;
use std::process::Command;

const BINARIES: [&str; 2] = [
    env!("CARGO_BIN_EXE_portcullis"),
    env!("CARGO_BIN_EXE_portcullis-agent"),
];

fn run(binary: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(binary).args(args).output().expect("run");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The lines of one `Heading:` section of clap's help, up to the next blank line.
fn section<'a>(help: &'a str, heading: &str) -> Vec<&'a str> {
    help.lines()
        .skip_while(|l| *l != heading)
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .collect()
}

/// The subcommand names a help text lists (not `help`).
fn subcommands(help: &str) -> Vec<String> {
    section(help, "Commands:")
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// Every command path of `binary`: `[]`, `["serve"]`, `["schedule", "import-afs"]`, ...
fn command_paths(binary: &str) -> Vec<Vec<String>> {
    let mut paths = vec![Vec::new()];
    let mut i = 0;
    while i < paths.len() {
        let mut args: Vec<&str> = paths[i].iter().map(String::as_str).collect();
        args.push("--help");
        let (code, help, stderr) = run(binary, &args);
        assert_eq!(code, Some(0), "{binary} {args:?}: {stderr}");
        for name in subcommands(&help) {
            let mut path = paths[i].clone();
            path.push(name);
            paths.push(path);
        }
        i += 1;
    }
    paths
}

/// Option and argument lines of a help text that say nothing: only the name (and a default or
/// the possible values, which are clap's, not a description).
fn undescribed(help: &str) -> Vec<String> {
    let mut missing = Vec::new();
    for heading in ["Arguments:", "Options:"] {
        let lines = section(help, heading);
        for (n, line) in lines.iter().enumerate() {
            let entry = line.trim_start();
            if !(entry.starts_with('-') || entry.starts_with('<') || entry.starts_with('[')) {
                continue; // a continuation line
            }
            // Name and description are separated by two spaces or more.
            let described = entry.split_once("  ").is_some_and(|(_, rest)| {
                let mut text = rest.trim();
                while let Some(start) = text.rfind(" [").or(text.starts_with('[').then_some(0))
                    && text.ends_with(']')
                {
                    text = text[..start].trim_end();
                }
                !text.is_empty()
            });
            // clap may put a long description on the next, deeper-indented line.
            let next_is_text = lines.get(n + 1).is_some_and(|next| {
                let indent = |s: &str| s.len() - s.trim_start().len();
                indent(next) > indent(line) && !next.trim_start().starts_with('-')
            });
            if !described && !next_is_text {
                missing.push(line.to_string());
            }
        }
    }
    missing
}

#[test]
fn the_undescribed_check_sees_a_bare_option() {
    let help = "Usage: x\n\nArguments:\n  <FILE>  \n\nOptions:\n      --config <FILE>  \n      --log-format <F>  [possible values: json, text]\n      --from <IP>  Client address [default: 127.0.0.1]\n  -h, --help  Print help\n";
    assert_eq!(
        undescribed(help),
        [
            "  <FILE>  ",
            "      --config <FILE>  ",
            "      --log-format <F>  [possible values: json, text]"
        ]
    );
}

#[test]
fn help_describes_every_option_of_every_subcommand_of_both_binaries() {
    for binary in BINARIES {
        let paths = command_paths(binary);
        assert!(paths.len() >= 4, "{binary}: {paths:?}");
        for path in &paths {
            let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
            args.push("--help");
            let (_, help, _) = run(binary, &args);
            let missing = undescribed(&help);
            assert!(
                missing.is_empty(),
                "{binary} {}: options without a description: {missing:#?}\n{help}",
                path.join(" ")
            );
            // clap states a default; the description does not say it again.
            for line in help.lines() {
                if let Some((text, _)) = line.split_once("[default: ") {
                    assert!(
                        !text.to_ascii_lowercase().contains("default"),
                        "{binary} {}: the default stated twice: {line}",
                        path.join(" ")
                    );
                }
            }
        }
    }
    let (_, help, _) = run(BINARIES[0], &["--help"]);
    for name in ["serve", "check-config", "explain", "completions", "man"] {
        assert!(subcommands(&help).iter().any(|s| s == name), "{help}");
    }
}

#[test]
fn completions_are_printed_for_every_shell() {
    for binary in BINARIES {
        for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
            let (code, script, stderr) = run(binary, &["completions", shell]);
            assert_eq!(code, Some(0), "{binary} {shell}: {stderr}");
            assert!(script.contains("completions"), "{binary} {shell}");
        }
    }
    let (_, script, _) = run(BINARIES[0], &["completions", "bash"]);
    for name in [
        "serve",
        "check-config",
        "hash-password",
        "health",
        "schedule",
        "import-afs",
        "explain",
        "learn",
        "man",
    ] {
        assert!(script.contains(name), "bash completions lack {name}");
    }
    // bash itself takes the script and registers it.
    if Command::new("bash").arg("--version").output().is_ok() {
        let (_dir, path) = temp_file("portcullis.bash", &script);
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {} && complete -p portcullis",
                path.display()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("portcullis"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (code, _, stderr) = run(BINARIES[0], &["completions", "tcsh"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("possible values: bash"), "{stderr}");
}

#[test]
fn the_man_page_names_every_subcommand_and_renders_cleanly() {
    for (binary, name) in BINARIES.iter().zip(["portcullis", "portcullis-agent"]) {
        let (code, page, stderr) = run(binary, &["man"]);
        assert_eq!(code, Some(0), "{stderr}");
        let first = page
            .lines()
            .find(|l| !l.starts_with(".ie") && !l.starts_with(".el"));
        assert!(
            first.is_some_and(|l| l.starts_with(&format!(".TH {name} 1"))),
            "{page}"
        );
        let mut paths = command_paths(binary);
        paths.retain(|p| !p.is_empty());
        assert!(paths.len() >= 3);
        for path in paths {
            let heading = format!(".SS \"{name} {}\"", path.join(" "));
            assert!(page.contains(&heading), "no {heading} in the page");
        }
        // Rendered by man(1) where it is installed: no warnings from groff.
        if Command::new("man").arg("--version").output().is_ok() {
            let (_dir, path) = temp_file(&format!("{name}.1"), &page);
            let out = Command::new("man")
                .args(["--warnings", "-l"])
                .arg(&path)
                .env("MANWIDTH", "100")
                .env("MAN_KEEP_FORMATTING", "0")
                .output()
                .unwrap();
            // Without a terminal, man still overstrikes bold ("C\x08C"): keep the letters.
            let mut rendered = String::new();
            for c in String::from_utf8_lossy(&out.stdout).chars() {
                if c == '\x08' {
                    rendered.pop();
                } else {
                    rendered.push(c);
                }
            }
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&out.stderr), "", "man warns");
            assert!(
                rendered.contains("COMMANDS") && rendered.contains(&format!("{name} man")),
                "{rendered}"
            );
        }
    }
}

/// One version everywhere: `--version` of both binaries is Cargo.toml's (so is the `build_info`
/// metric, tests/it/admin.rs, and both packages, .ci/deb and .ci/msi), and CHANGELOG.md has a
/// section for it.
#[test]
fn both_binaries_and_the_changelog_carry_the_version_in_cargo_toml() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("a version line in Cargo.toml");
    for (binary, name) in BINARIES.iter().zip(["portcullis", "portcullis-agent"]) {
        let (code, stdout, stderr) = run(binary, &["--version"]);
        assert_eq!(code, Some(0), "{stderr}");
        assert_eq!(stdout, format!("{name} {version}\n"));
    }
    let changelog = std::fs::read_to_string(root.join("CHANGELOG.md")).unwrap();
    assert!(
        changelog
            .lines()
            .any(|l| l.starts_with(&format!("## [{version}]"))),
        "CHANGELOG.md has no section for {version}"
    );
}

/// README's Run command, `cargo run --release -- serve`, starts the gateway: with two binaries
/// in the package, cargo needs `default-run` to know which (without it the command fails).
#[test]
fn cargo_run_starts_the_gateway_as_the_readme_says() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest: toml::Table = std::fs::read_to_string(root.join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        manifest["package"]["default-run"].as_str(),
        Some("portcullis"),
        "Cargo.toml's [package] default-run"
    );
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.contains("cargo run --release -- serve"));
}
