//! Running host commands with readable errors.

use std::process::{Command, Stdio};

use crate::error::{Result, XtaskError};

/// Render a command line for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn tail(bytes: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Run `cmd`, inheriting stdio; fail on non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let what = describe(cmd);
    eprintln!("xtask: $ {what}");
    let status = cmd.status().map_err(|source| XtaskError::Spawn {
        cmd: what.clone(),
        source,
    })?;
    if !status.success() {
        return Err(XtaskError::Command {
            cmd: what,
            status,
            output: String::new(),
        });
    }
    Ok(())
}

/// Run `cmd` capturing stdout+stderr; fail on non-zero exit (with the output tail).
pub fn output(cmd: &mut Command) -> Result<String> {
    let what = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| XtaskError::Spawn {
            cmd: what.clone(),
            source,
        })?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        let mut both = out.stdout.clone();
        both.extend_from_slice(&out.stderr);
        return Err(XtaskError::Command {
            cmd: what,
            status: out.status,
            output: tail(&both, 40),
        });
    }
    Ok(text)
}
