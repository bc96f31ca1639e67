//! The gateway's TLS server stream, on rustls's unbuffered API. With the buffered API every
//! connection keeps a 4 KiB record buffer from its first read to its end; thousands of idle
//! sync tunnels paid for it. Here the stream owns its buffers and holds them only while they
//! hold bytes: the received records take a buffer from the tunnel's spare pool when the socket
//! turns readable and give it back once no partial record is left; the encrypted output does
//! the same until the socket has taken it. An idle tunnel holds rustls's state and nothing
//! else.

use crate::tunnel::copy::{give_back, take_buffer};
use crate::tunnel::spare::{self, Spares};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// The most plaintext encrypted into one record.
const RECORD_PLAINTEXT: usize = 16 * 1024;
/// A record's header, content type, tag and padding room, at most.
const RECORD_OVERHEAD: usize = 256;
/// An outgoing buffer holds four full records: a tunnel's 64 KiB chunk goes out in one write.
const OUTGOING_BYTES: usize = 4 * (RECORD_PLAINTEXT + RECORD_OVERHEAD);
/// Drained outgoing buffers kept per worker thread.
const SPARE_OUTGOING_PER_THREAD: usize = 8;
/// After a failed handshake's alert, how long and how much of the client's input is read
/// before closing (a client that takes the alert closes at once).
const ALERT_LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(1);
const ALERT_LINGER_BYTES: usize = 64 * 1024;

thread_local! {
    static SPARE_OUTGOING: Spares<Box<[u8]>> = const { Spares::new() };
}

fn take_outgoing() -> Box<[u8]> {
    spare::take(&SPARE_OUTGOING).unwrap_or_else(|| vec![0; OUTGOING_BYTES].into_boxed_slice())
}

/// A TLS connection from a client, after its handshake.
pub struct ServerTls {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Received TLS bytes not yet processed: `start..used` of the buffer (processed records
    /// are skipped, not moved; a partial record moves to the front before the next read).
    incoming: Option<Box<[u8]>>,
    start: usize,
    used: usize,
    /// Decrypted bytes the caller has not read yet (a record larger than its buffer).
    plaintext: Vec<u8>,
    plaintext_read: usize,
    /// Encrypted bytes the socket has not taken yet (`sent..filled` of them).
    outgoing: Option<Box<[u8]>>,
    sent: usize,
    filled: usize,
    /// The client sent close_notify (or its socket ended): reads return EOF.
    read_closed: bool,
    /// close_notify is queued: writes are refused.
    write_closed: bool,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl ServerTls {
    /// Runs the handshake on `tcp` (the caller bounds it with a timeout).
    pub async fn accept(tcp: TcpStream, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut tls = Self {
            tcp,
            conn,
            incoming: None,
            start: 0,
            used: 0,
            plaintext: Vec::new(),
            plaintext_read: 0,
            outgoing: None,
            sent: 0,
            filled: 0,
            read_closed: false,
            write_closed: false,
        };
        if let Err(e) = std::future::poll_fn(|cx| tls.poll_handshake(cx)).await {
            tls.send_alert().await;
            return Err(e);
        }
        Ok(tls)
    }

    /// After a failed handshake: sends the alert rustls queued for the failure, so the client
    /// can name it (`certificate_expired`, `unknown_ca`) instead of seeing a bare end of file.
    /// Then half-closes and reads what the client still sends until it closes too, briefly:
    /// closing with unread input resets the connection, and a reset can destroy the alert
    /// before the client reads it (Windows discards received data on a reset).
    async fn send_alert(&mut self) {
        // rustls keeps a failed connection's pending records: an alert is one record, so a few
        // turns encode it; with nothing pending (the client left) nothing is sent.
        let before = self.filled;
        for _ in 0..4 {
            if !matches!(self.step(None, Write::Nothing), Ok(Step::Progress)) {
                break;
            }
        }
        let queued = self.filled > before;
        if !queued {
            return;
        }
        let farewell = async {
            std::future::poll_fn(|cx| self.poll_send(cx)).await?;
            self.tcp.shutdown().await?;
            let mut sink = [0u8; 1024];
            let mut drained = 0;
            while drained < ALERT_LINGER_BYTES {
                match self.tcp.read(&mut sink).await? {
                    0 => break,
                    n => drained += n,
                }
            }
            io::Result::Ok(())
        };
        let _ = tokio::time::timeout(ALERT_LINGER_TIME, farewell).await;
    }

    /// The client's verified certificate chain, leaf first.
    pub fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            // A flight goes out in one write, when rustls waits for the client or is done.
            match self.step(None, Write::Nothing)? {
                Step::Progress => {}
                Step::Traffic | Step::Written => {
                    ready!(self.poll_send(cx))?;
                    return Poll::Ready(Ok(()));
                }
                Step::NeedInput => {
                    ready!(self.poll_send(cx))?;
                    if ready!(self.poll_receive(cx))? == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the client closed during the TLS handshake",
                        )));
                    }
                }
            }
        }
    }

    /// One turn of rustls's state machine over the bytes received so far: records to encode
    /// go to the outgoing buffer; decrypted ones to `into` while it has room, the rest to
    /// `plaintext`; once data may flow, `write` is encrypted into the outgoing buffer.
    fn step(&mut self, mut into: Option<&mut ReadBuf<'_>>, write: Write<'_>) -> io::Result<Step> {
        let mut empty = [0u8; 0];
        let incoming = match &mut self.incoming {
            Some(buf) => &mut buf[self.start..self.used],
            None => &mut empty[..],
        };
        let status = self.conn.process_tls_records(incoming);
        let discard = status.discard;
        let state = match status.state {
            Ok(state) => state,
            Err(e) => {
                // Discarded before rustls is asked again: after a failed handshake, for its
                // alert (`send_alert`).
                self.discard(discard);
                return Err(tls_error(e));
            }
        };
        let step = match state {
            ConnectionState::ReadTraffic(mut records) => {
                while let Some(record) = records.next_record() {
                    let mut payload = record.map_err(tls_error)?.payload;
                    if let Some(buf) = into.as_deref_mut()
                        && self.plaintext.is_empty()
                    {
                        let n = payload.len().min(buf.remaining());
                        buf.put_slice(&payload[..n]);
                        payload = &payload[n..];
                    }
                    self.plaintext.extend_from_slice(payload);
                }
                Step::Progress
            }
            ConnectionState::EncodeTlsData(mut data) => {
                let out = self.outgoing.get_or_insert_with(take_outgoing);
                let n = match data.encode(&mut out[self.filled..]) {
                    Ok(n) => n,
                    // A flight larger than the buffer (a long certificate chain): rustls keeps
                    // the message until it is encoded, so grow the buffer and encode again.
                    Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                        let mut larger = vec![0; self.filled + required_size].into_boxed_slice();
                        larger[..self.filled].copy_from_slice(&out[..self.filled]);
                        *out = larger;
                        data.encode(&mut out[self.filled..])
                            .map_err(|e| io::Error::other(e.to_string()))?
                    }
                    Err(e) => return Err(io::Error::other(e.to_string())),
                };
                self.filled += n;
                Step::Progress
            }
            // Queued in order in the outgoing buffer, which `poll_send` drains before anything
            // else is written: as good as sent.
            ConnectionState::TransmitTlsData(data) => {
                data.done();
                Step::Progress
            }
            ConnectionState::BlockedHandshake => Step::NeedInput,
            ConnectionState::WriteTraffic(_) if matches!(write, Write::Nothing) => Step::Traffic,
            ConnectionState::WriteTraffic(mut traffic) => {
                let out = self.outgoing.get_or_insert_with(take_outgoing);
                let room = &mut out[self.filled..];
                let encoded = match write {
                    Write::Data(data) => traffic.encrypt(data, room),
                    _ => traffic.queue_close_notify(room),
                };
                self.filled += encoded.map_err(|e| io::Error::other(e.to_string()))?;
                Step::Written
            }
            // Writing may go on after the client's close_notify; the next turn says so.
            ConnectionState::PeerClosed => {
                self.read_closed = true;
                Step::Progress
            }
            ConnectionState::Closed => {
                self.read_closed = true;
                Step::Traffic
            }
            _ => return Err(io::Error::other("unexpected TLS state (early data is off)")),
        };
        self.discard(discard);
        Ok(step)
    }

    fn discard(&mut self, n: usize) {
        self.start += n;
        self.release_if_empty();
    }

    /// Reads from the socket into the incoming buffer; `Ready(0)` at the socket's end.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.incoming.is_none() {
            ready!(self.tcp.poll_read_ready(cx))?;
        }
        let buf = self.incoming.get_or_insert_with(take_buffer);
        if self.start > 0 {
            buf.copy_within(self.start..self.used, 0);
            (self.start, self.used) = (0, self.used - self.start);
        }
        if self.used == buf.len() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a TLS record larger than the buffer",
            )));
        }
        let mut read = ReadBuf::new(&mut buf[self.used..]);
        match Pin::new(&mut self.tcp).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                self.used += n;
                self.release_if_empty();
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                self.release_if_empty();
                Poll::Pending
            }
        }
    }

    fn release_if_empty(&mut self) {
        if self.start == self.used
            && let Some(buf) = self.incoming.take()
        {
            (self.start, self.used) = (0, 0);
            give_back(buf);
        }
    }

    /// Writes the outgoing buffer to the socket; `Ready` once it is empty.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.filled {
            let out = self.outgoing.as_ref().expect("bytes to send");
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &out[self.sent..self.filled]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        (self.sent, self.filled) = (0, 0);
        if let Some(buf) = self.outgoing.take()
            && buf.len() == OUTGOING_BYTES
        {
            spare::give_back(&SPARE_OUTGOING, buf, SPARE_OUTGOING_PER_THREAD);
        }
        Poll::Ready(Ok(()))
    }

    /// Copies decrypted bytes kept from an earlier record to `buf`, as many as fit.
    fn take_plaintext(&mut self, buf: &mut ReadBuf<'_>) {
        let waiting = &self.plaintext[self.plaintext_read..];
        if waiting.is_empty() {
            return;
        }
        let n = waiting.len().min(buf.remaining());
        buf.put_slice(&waiting[..n]);
        self.plaintext_read += n;
        if self.plaintext_read == self.plaintext.len() {
            // Kept for the next record while data flows; freed when the socket goes quiet.
            self.plaintext.clear();
            self.plaintext_read = 0;
        }
    }
}

/// What a turn of the state machine asks for next.
enum Step {
    /// It did something; turn again.
    Progress,
    /// Application data may flow (or the peer has closed).
    Traffic,
    /// The bytes to write are encrypted in the outgoing buffer.
    Written,
    /// It needs more bytes from the client.
    NeedInput,
}

/// What to encrypt once data may flow.
#[derive(Clone, Copy)]
enum Write<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

impl AsyncRead for ServerTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        loop {
            this.take_plaintext(buf);
            if this.read_closed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // Answers rustls owes the client (a key update) go out before more is read (not
            // once bytes are in `buf`: a read that returns Pending must not have read).
            if buf.filled().len() == before {
                ready!(this.poll_send(cx))?;
            }
            // As many records as are complete and fit: one read per buffer, not per record.
            if let Step::Progress = this.step(Some(buf), Write::Nothing)? {
                continue;
            }
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            match this.poll_receive(cx) {
                Poll::Ready(Ok(0)) => {
                    // The socket ended without close_notify: the tunnel's end, not a fault.
                    this.read_closed = true;
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Idle: the record memory goes back too.
                    if this.plaintext.is_empty() {
                        this.plaintext = Vec::new();
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl AsyncWrite for ServerTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // What was encrypted before goes out first; then as many records as the outgoing
        // buffer holds, sent with one write.
        ready!(this.poll_send(cx))?;
        let mut taken = 0;
        while taken < data.len() {
            let take = (data.len() - taken).min(RECORD_PLAINTEXT);
            let room = this.outgoing.as_ref().map_or(OUTGOING_BYTES, |b| b.len()) - this.filled;
            if taken > 0 && room < take + RECORD_OVERHEAD {
                break;
            }
            match this.step(None, Write::Data(&data[taken..taken + take]))? {
                Step::Written => taken += take,
                Step::Progress if taken == 0 => ready!(this.poll_send(cx))?,
                Step::Progress => break,
                Step::Traffic => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Step::NeedInput => {
                    return Poll::Ready(Err(io::Error::other("TLS is not ready for data")));
                }
            }
        }
        // The records are ours to send now; a socket that is not ready keeps them for the next
        // write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        while !this.write_closed {
            match this.step(None, Write::CloseNotify)? {
                Step::Progress => ready!(this.poll_send(cx))?,
                // Written, or the peer already closed both ways: nothing more to say.
                _ => this.write_closed = true,
            }
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server on loopback and a tokio-rustls client (the buffered API, as real clients are)
    /// that trusts it.
    async fn connected() -> (ServerTls, tokio_rustls::client::TlsStream<TcpStream>) {
        let certified = rcgen::generate_simple_self_signed(["gw.test".to_owned()]).unwrap();
        let cert = CertificateDer::from(certified.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let mut client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Lets a test read the client's record counters at the end.
        client.enable_secret_extraction = true;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connecting = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect(ServerName::try_from("gw.test").unwrap(), tcp)
                .await
                .unwrap()
        };
        let accepting = async {
            let (tcp, _) = listener.accept().await.unwrap();
            ServerTls::accept(tcp, Arc::new(server)).await.unwrap()
        };
        tokio::join!(accepting, connecting)
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_intact_through_small_reads_and_an_idle_stream_holds_no_buffer() {
        let (mut server, mut client) = connected().await;
        let up = pattern(3 << 20, 1);
        let down = pattern(3 << 20, 2);
        let sending = {
            let up = up.clone();
            async move {
                client.write_all(&up).await.unwrap();
                client.flush().await.unwrap();
                let mut got = vec![0; 3 << 20];
                client.read_exact(&mut got).await.unwrap();
                (client, got)
            }
        };
        let serving = async {
            // Reads smaller than a record: the rest of a record waits in the stream.
            let mut got = Vec::new();
            let mut small = [0u8; 1000];
            while got.len() < up.len() {
                let n = server.read(&mut small).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&small[..n]);
            }
            server.write_all(&down).await.unwrap();
            server.flush().await.unwrap();
            got
        };
        let (server_got, (mut client, client_got)) = tokio::join!(serving, sending);
        assert!(server_got == up, "upload arrived intact");
        assert!(client_got == down, "download arrived intact");

        // Quiet now: a read that finds nothing gives every buffer back.
        let mut one = [0u8; 1];
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(50), server.read(&mut one)).await;
        assert!(waited.is_err(), "nothing to read");
        assert!(server.incoming.is_none(), "no receive buffer while idle");
        assert!(server.outgoing.is_none(), "no send buffer while idle");
        assert_eq!(
            server.plaintext.capacity(),
            0,
            "no plaintext kept while idle"
        );

        // close_notify from the client is the end of its data; the server's reaches the client.
        client.shutdown().await.unwrap();
        assert_eq!(server.read(&mut one).await.unwrap(), 0);
        server.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    /// A client's key update (TLS 1.3; rustls asks for the peer's in return): the stream takes
    /// it while reading, queues its own answer ahead of the next data, and data goes on both
    /// ways. The client's receive counter proves the server's own update reached it: a record
    /// counter starts again at 0 with each new key.
    #[tokio::test]
    async fn a_key_update_from_the_client_is_answered_and_data_goes_on() {
        let (mut server, mut client) = connected().await;
        for round in 0..3u8 {
            client.get_mut().1.refresh_traffic_keys().unwrap();
            let up = pattern(100_000, round);
            client.write_all(&up).await.unwrap();
            client.flush().await.unwrap();
            let mut got = vec![0; up.len()];
            server.read_exact(&mut got).await.unwrap();
            assert!(got == up, "round {round}: upload after the key update");
            let down = pattern(100_000, round ^ 0x55);
            server.write_all(&down).await.unwrap();
            server.flush().await.unwrap();
            let mut got = vec![0; down.len()];
            client.read_exact(&mut got).await.unwrap();
            assert!(got == down, "round {round}: download after the key update");
        }
        // Without the server's answer the client would still read under its first key, having
        // counted all three downloads (22 records, measured without key updates); with it,
        // only the last download's 7 (100,000 bytes in records of 16 KiB).
        let (_, connection) = client.into_inner();
        let secrets = connection.dangerous_extract_secrets().unwrap();
        let (received, _) = secrets.rx;
        assert!(
            (7..14).contains(&received),
            "records under the client's current receive key: {received}"
        );
    }

    #[tokio::test]
    async fn a_client_that_closes_its_socket_without_close_notify_ends_the_stream() {
        let (mut server, client) = connected().await;
        // A FIN without close_notify (dropping the socket would reset it: the client has
        // not read the session tickets).
        let (mut tcp, _) = client.into_inner();
        tcp.shutdown().await.unwrap();
        let mut buf = [0u8; 64];
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(server.read(&mut buf).await.unwrap(), 0, "then EOF");
    }
}
