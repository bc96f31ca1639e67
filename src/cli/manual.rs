//! Shell completions (`completions SHELL`) and the man page (`man`) of both binaries, made from
//! their clap definitions: the page says what `--help` says. One page per binary, every
//! subcommand a section of it (`portcullis man > /usr/local/share/man/man1/portcullis.1`).

use clap::Command;
pub use clap_complete::Shell;
use std::io::Write;

/// `completions`' argument, shared by both binaries.
#[derive(clap::Args)]
pub struct CompletionsArgs {
    /// The shell to write completions for (e.g. `completions bash >
    /// /etc/bash_completion.d/portcullis`).
    #[arg(value_enum, value_name = "SHELL")]
    pub shell: Shell,
}

/// The completion script of `cmd` for `shell`.
pub fn completions(mut cmd: Command, shell: Shell) -> Vec<u8> {
    let name = cmd.get_name().to_owned();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut out);
    out
}

/// The man page (roff) of `cmd`: name, synopsis, description and options, then a section per
/// subcommand (nested ones too) with its synopsis, description, options and arguments.
pub fn man_page(cmd: Command) -> Vec<u8> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut page = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = render(&cmd, &mut page);
    // Every rendered piece repeats roff's apostrophe preamble; once at the top is enough.
    let text = String::from_utf8_lossy(&page);
    let mut out = String::with_capacity(text.len());
    let mut preamble_seen = 0;
    for line in text.lines() {
        if PREAMBLE.contains(&line) {
            preamble_seen += 1;
            if preamble_seen > PREAMBLE.len() {
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out.into_bytes()
}

/// What the `roff` crate writes before every piece it renders.
const PREAMBLE: [&str; 2] = [".ie \\n(.g .ds Aq \\(aq", ".el .ds Aq '"];

fn render(cmd: &Command, out: &mut Vec<u8>) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    writeln!(out, ".SH COMMANDS")?;
    for sub in visible(cmd) {
        command_section(sub, out)?;
    }
    man.render_version_section(out)
}

fn visible(cmd: &Command) -> impl Iterator<Item = &Command> {
    cmd.get_subcommands().filter(|s| !s.is_hide_set())
}

/// One subcommand as a subsection: clap_mangen's sections without their `.SH` headings.
fn command_section(cmd: &Command, out: &mut Vec<u8>) -> std::io::Result<()> {
    let name = cmd.get_bin_name().unwrap_or_else(|| cmd.get_name());
    writeln!(out, ".SS \"{}\"", name.replace('"', ""))?;
    let man = clap_mangen::Man::new(cmd.clone());
    let mut body = Vec::new();
    man.render_synopsis_section(&mut body)?;
    body.extend_from_slice(b".PP\n");
    man.render_description_section(&mut body)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        body.extend_from_slice(b".PP\n");
        man.render_options_section(&mut body)?;
    }
    let text = String::from_utf8_lossy(&body);
    for line in text.lines().filter(|l| !l.starts_with(".SH")) {
        writeln!(out, "{line}")?;
    }
    for sub in visible(cmd) {
        command_section(sub, out)?;
    }
    Ok(())
}
