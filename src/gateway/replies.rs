//! The short replies of our own: an error reply with its reason (status line, header and
//! body), and the 200 that opens a tunnel. The gateway and the branch agent both answer with
//! these.

use tokio::io::{AsyncWrite, AsyncWriteExt};

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "Connection Established",
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Writes an error reply: status with the reason as its phrase (clients that show only the
/// status line, like urllib3 under the Azure SDK, show why), `Portcullis-Error: <reason>`, the
/// reason as the body, and `Connection: close` (the caller closes). `reason` is ours, never
/// client text; control characters are replaced anyway, so it cannot break the head.
pub async fn write_error<W: AsyncWrite + Unpin>(
    io: &mut W,
    status: u16,
    reason: &str,
) -> std::io::Result<()> {
    write_error_retry(io, status, reason, None).await
}

/// [`write_error`] with `Retry-After: seconds` when given (a draining branch's 503).
pub async fn write_error_retry<W: AsyncWrite + Unpin>(
    io: &mut W,
    status: u16,
    reason: &str,
    retry_after: Option<u64>,
) -> std::io::Result<()> {
    let retry = retry_after.map_or_else(String::new, |s| format!("Retry-After: {s}\r\n"));
    let allow = match status {
        405 => "Allow: CONNECT\r\n",
        407 => "Proxy-Authenticate: Basic realm=\"portcullis\"\r\n",
        _ => "",
    };
    let reason: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let phrase = if reason.is_empty() {
        reason_phrase(status)
    } else {
        &reason
    };
    let reply = format!(
        "HTTP/1.1 {status} {phrase}\r\nPortcullis-Error: {reason}\r\n{allow}{retry}Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reason}\n",
        reason.len() + 1
    );
    io.write_all(reply.as_bytes()).await?;
    io.flush().await
}

/// The tunnel is up.
pub async fn write_established<W: AsyncWrite + Unpin>(io: &mut W) -> std::io::Result<()> {
    io.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await?;
    io.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn error_replies_carry_the_reason_in_the_status_line_too() {
        let mut out = Vec::new();
        write_error(&mut out, 403, "host not allowed")
            .await
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 403 host not allowed\r\n"),
            "{text}"
        );
        assert!(
            text.contains("\r\nPortcullis-Error: host not allowed\r\n"),
            "{text}"
        );
        // Nothing can break the head, whatever a reason carries.
        let mut out = Vec::new();
        write_error(&mut out, 502, "bad\r\nX-Injected: 1")
            .await
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 502 bad  X-Injected: 1\r\n"),
            "{text}"
        );
        assert!(!text.contains("\r\nX-Injected"), "{text}");
    }
}
