//! The check report for people: the client certificate's line, then one row per endpoint, a
//! cell per stage with its time, the failure reason at the end of the row; colour only when
//! asked or writing to a terminal.

use super::check::{Outcome, Report, Row, RowResult, Stage};
use std::fmt::Write;

const GREEN: &str = "\x1b[32m";
const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const RESET: &str = "\x1b[0m";

/// The report as a table (no trailing colour codes when `colour` is off).
pub fn table(report: &Report, colour: bool) -> String {
    let paint = |text: String, code: &str| {
        if colour {
            format!("{code}{text}{RESET}")
        } else {
            text
        }
    };
    let mut rows: Vec<[String; 8]> = vec![[
        "RESULT".into(),
        "ENDPOINT".into(),
        "CATEGORY".into(),
        "PROXY".into(),
        "AUTH".into(),
        "CONNECT".into(),
        "TLS".into(),
        "DIRECT".into(),
    ]];
    let mut notes = Vec::new();
    for row in &report.endpoints {
        rows.push(cells(row));
        notes.push(row.note.clone().unwrap_or_default());
    }
    let mut widths = [0usize; 8];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = format!("proxy: {}\n", report.proxy);
    if let Some(certificate) = &report.certificate {
        let line = match certificate.outcome {
            Outcome::Pass => format!("certificate: ok {}", certificate.path),
            _ => paint(format!("certificate: FAIL {}", certificate.path), RED),
        };
        let _ = writeln!(
            out,
            "{line} ({}): {}",
            certificate.subject, certificate.detail
        );
    }
    for (i, row) in rows.iter().enumerate() {
        let mut line = String::new();
        for (col, (cell, width)) in row.iter().zip(widths).enumerate() {
            let padded = format!("{cell:<width$}  ");
            let painted = match (i, col) {
                (0, _) => padded,
                (_, 0) => match report.endpoints[i - 1].result {
                    RowResult::Pass => paint(padded, GREEN),
                    RowResult::Fail => paint(padded, RED),
                    RowResult::Skip => paint(padded, YELLOW),
                },
                _ if cell.starts_with("FAIL") || cell.starts_with("OPEN") => paint(padded, RED),
                _ => padded,
            };
            line.push_str(&painted);
        }
        if i > 0 {
            line.push_str(&notes[i - 1]);
        } else {
            line.push_str("NOTE");
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let _ = writeln!(
        out,
        "{} passed, {} failed, {} skipped",
        report.passed, report.failed, report.skipped
    );
    out
}

fn cells(row: &Row) -> [String; 8] {
    let result = match row.result {
        RowResult::Pass => "pass",
        RowResult::Fail => "FAIL",
        RowResult::Skip => "skip",
    };
    let direct = match &row.direct {
        None => "-".to_owned(),
        Some(d) if d.open => "OPEN".to_owned(),
        Some(_) => "closed".to_owned(),
    };
    let connect = match (&row.connect.outcome, &row.verdict) {
        (Outcome::NotRun, _) | (_, None) => stage(&row.connect),
        (_, Some(v)) => format!(
            "{} {}{}",
            if row.connect.outcome == Outcome::Pass {
                "ok"
            } else {
                "FAIL"
            },
            v.status,
            row.connect
                .ms
                .map(|m| format!(" {m}ms"))
                .unwrap_or_default()
        ),
    };
    [
        result.into(),
        format!("{}:{}", row.host, row.port),
        row.category.clone(),
        stage(&row.proxy),
        stage(&row.auth),
        connect,
        stage(&row.tls),
        direct,
    ]
}

fn stage(stage: &Stage) -> String {
    match stage.outcome {
        Outcome::Pass => format!("ok {}ms", stage.ms.unwrap_or_default()),
        Outcome::Fail => "FAIL".into(),
        Outcome::NotRun => "-".into(),
    }
}
