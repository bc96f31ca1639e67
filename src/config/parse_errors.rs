//! What the TOML parser and serde report, in the form of every other problem: the key comes
//! from the document's own spans (the innermost key or value at the error's position), and
//! serde's wording ("invalid value: integer `70000`, expected u16") becomes ours
//! ("70000: expected a port from 1 to 65535"). Syntax errors keep the parser's message; an
//! unknown key gains the nearest known one.

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// The dotted key at byte `offset` of `source`, as in `policy.allow[1].ports[0]`; empty when the
/// document does not parse (a syntax error) or nothing is there.
pub(super) fn key_at(source: &str, offset: usize) -> String {
    let Ok(root) = DeTable::parse(source) else {
        return String::new();
    };
    let mut best: Option<(usize, usize, String)> = None;
    visit_table(root.get_ref(), "", offset, &mut best);
    best.map(|(_, _, key)| key).unwrap_or_default()
}

/// Keeps in `best` the narrowest span holding `offset`, the deepest key on a tie (a table's
/// header is the span of the array element and of the array alike).
fn consider(
    span: std::ops::Range<usize>,
    key: &str,
    offset: usize,
    best: &mut Option<(usize, usize, String)>,
) {
    let holds = span.start <= offset && (offset < span.end || span.start == span.end);
    if !holds {
        return;
    }
    let width = span.end - span.start;
    let depth = key.len();
    let better = match best {
        None => true,
        Some((w, d, _)) => width < *w || (width == *w && depth > *d),
    };
    if better {
        *best = Some((width, depth, key.to_owned()));
    }
}

fn visit_table(
    table: &DeTable<'_>,
    prefix: &str,
    offset: usize,
    best: &mut Option<(usize, usize, String)>,
) {
    for (name, value) in table.iter() {
        let key = join_key(prefix, name.get_ref());
        consider(name.span(), &key, offset, best);
        visit_value(value, &key, offset, best);
    }
}

fn visit_value(
    value: &Spanned<DeValue<'_>>,
    key: &str,
    offset: usize,
    best: &mut Option<(usize, usize, String)>,
) {
    consider(value.span(), key, offset, best);
    match value.get_ref() {
        DeValue::Table(table) => visit_table(table, key, offset, best),
        DeValue::Array(array) => {
            for (i, item) in array.iter().enumerate() {
                visit_value(item, &format!("{key}[{i}]"), offset, best);
            }
        }
        _ => {}
    }
}

/// `prefix.name`, quoting a name that is not a bare TOML key (`resolver.hosts."a.example"`).
fn join_key(prefix: &str, name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let name = if bare {
        name.to_owned()
    } else {
        format!("{name:?}")
    };
    if prefix.is_empty() {
        name
    } else {
        format!("{prefix}.{name}")
    }
}

/// The key and message for a parser error at `key`: serde's wording rewritten into ours;
/// anything not recognised is kept as the parser said it.
pub(super) fn reword(message: &str, key: &str) -> (String, String) {
    let message = message.trim_end();
    if message.starts_with("unknown field `") {
        return (key.to_owned(), with_suggestion(message));
    }
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        return (key.to_owned(), format!("`{field}` is required"));
    }
    if let Some(rest) = message.strip_prefix("unknown variant `")
        && let Some((found, _)) = rest.split_once('`')
    {
        let expected = one_of(key).map_or_else(|| variants(rest), str::to_owned);
        return (key.to_owned(), format!("{found:?}: expected {expected}"));
    }
    if message == "wanted string or table"
        && let Some(expected) = one_of(key)
    {
        return (key.to_owned(), format!("expected {expected}"));
    }
    let found_expected = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
        .and_then(|rest| rest.rsplit_once(", expected "));
    match found_expected {
        Some((found, expected)) => (
            key.to_owned(),
            format!(
                "{}: expected {}",
                found_value(found),
                expected_value(expected, key)
            ),
        ),
        None => (key.to_owned(), message.to_owned()),
    }
}

/// The key's pattern, indices dropped: `policy.allow[2].ports[0]` -> `policy.allow[].ports[]`.
fn pattern(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut in_index = false;
    for c in key.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index => {}
            _ => out.push(c),
        }
    }
    out
}

/// The names a key of an enumerated kind takes, in the config reference's words.
fn one_of(key: &str) -> Option<&'static str> {
    Some(match pattern(key).as_str() {
        "policy.mode" => r#""enforce" or "report""#,
        "policy.sni" | "policy.allow[].sni" => r#""match", "allowed" or "off""#,
        "policy.on_reload" => r#""keep" or "close-denied""#,
        "log.format" => r#""text" or "json""#,
        "log.on_write_failure" => r#""keep-serving" or "fail-closed""#,
        "listen.tls_proxy[].client_certificates" => r#""required", "optional" or "off""#,
        _ => return None,
    })
}

/// serde's "`a`, `b` or `c`" / "one of `a`, `b`, `c`" with quotes instead of backticks.
fn variants(rest: &str) -> String {
    let list = rest.split_once("expected ").map_or("", |(_, l)| l);
    let names: Vec<String> = list
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|n| format!("{n:?}"))
        .collect();
    match names.split_last() {
        None => "a known name".to_owned(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

/// serde's "integer `70000`", "string \"a\"", "sequence" as the value or kind written.
fn found_value(found: &str) -> String {
    let quoted = |s: &str| {
        s.split_once('`')
            .and_then(|(_, r)| r.rsplit_once('`'))
            .map(|(v, _)| v.to_owned())
    };
    if let Some(s) = found.strip_prefix("string ") {
        return s.to_owned();
    }
    for kind in ["integer ", "floating point ", "boolean "] {
        if found.starts_with(kind)
            && let Some(v) = quoted(found)
        {
            return v;
        }
    }
    match found {
        "sequence" => "a list".to_owned(),
        "map" => "a table".to_owned(),
        other => other.to_owned(),
    }
}

/// What a key takes, from serde's type name and the key (a `u16` is a port, a string under
/// `timeouts` is a duration, a list of tables is `[[...]]`).
fn expected_value(serde: &str, key: &str) -> String {
    let pattern = pattern(key);
    let last = pattern.rsplit('.').next().unwrap_or("");
    let is_duration = pattern.starts_with("timeouts.")
        || pattern == "resolver.timeout"
        || pattern == "tls.handshake_timeout";
    let text = match serde {
        "u16" if last.starts_with("ports") => "a port from 1 to 65535",
        "u8" if pattern == "limits.ipv6_client_prefix" => "a prefix length from 1 to 128",
        "u8" => "a whole number from 0 to 255",
        "u16" => "a whole number from 0 to 65535",
        "u32" => "a whole number from 0 to 4294967295",
        "a boolean" => "true or false",
        "a string" if is_duration => "a duration such as \"10s\", \"15m\" or \"1h\"",
        "a string" => "a string",
        "a sequence" => match pattern.as_str() {
            "policy.allow[].ports" => "a list of ports such as [443]",
            "branch[].credentials" => {
                "a list of { user = \"...\", password_hash = \"...\" } tables"
            }
            "branch" | "schedule" | "policy.allow" | "listen.tls_proxy" => {
                return format!("[[{key}]] tables");
            }
            _ => "a list of strings",
        },
        s if s.starts_with("struct ") || s == "a map" => "a table",
        other => return other.to_owned(),
    };
    text.to_owned()
}

/// `message` of the TOML parser, with the nearest known key suggested for an unknown one
/// ("unknown field `port`, expected one of `name`, ..., `ports`" gains "; did you mean `ports`?").
pub(super) fn with_suggestion(message: &str) -> String {
    let suggestion = (|| {
        let rest = message.strip_prefix("unknown field `")?;
        let (unknown, rest) = rest.split_once('`')?;
        let known = rest.split_once("expected one of ")?.1;
        known
            .split('`')
            .skip(1)
            .step_by(2)
            .map(|k| (edit_distance(unknown, k), k))
            .filter(|&(d, k)| d <= 2.max(k.len() / 3))
            .min()
            .map(|(_, k)| k.to_owned())
    })();
    match suggestion {
        Some(key) => format!("{message}; did you mean `{key}`?"),
        None => message.to_owned(),
    }
}

/// The name of `known` nearest to `unknown`, if near enough to be a likely typo.
pub(super) fn nearest<'a>(unknown: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|&k| (edit_distance(unknown, k), k))
        .filter(|&(d, k)| d <= 2.max(k.len() / 3))
        .min()
        .map(|(_, k)| k)
}

/// Levenshtein distance, for key suggestions (short strings only).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substituted = previous + usize::from(ca != cb);
            previous = row[j + 1];
            row[j + 1] = substituted.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}
