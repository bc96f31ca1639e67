//! A network namespace of the test's own (`ip netns add`, root only), with its loopback up and
//! addresses the test adds and removes (192.0.2.x, 2001:db8::x: documentation ranges, reachable
//! only inside the namespace). Processes run in it through `ip netns exec` (which execs the
//! program, so a child's PID is the program's); a small Python origin and client work inside it.
//! Deleted when dropped.

use std::io::BufRead;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// A fresh namespace with loopback up; `None` (after saying why) where this host does not
    /// let the test make one.
    pub fn create() -> Option<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("pc-test-{}-{n}", std::process::id());
        let added = Command::new("ip").args(["netns", "add", &name]).output();
        match added {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                eprintln!(
                    "skipped: cannot make a network namespace: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                return None;
            }
            Err(e) => {
                eprintln!("skipped: no `ip` command: {e}");
                return None;
            }
        }
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        Some(ns)
    }

    /// `ip -n NAME ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The wrapper that runs a program inside: `ip netns exec NAME`.
    pub fn wrapper(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    fn python(&self, script: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name, "python3", "-u", "-c", script])
            .args(args);
        command
    }

    /// Sends `request` to `addr` from inside and returns what came back within 5 s.
    pub fn exchange(&self, addr: std::net::SocketAddr, request: &str) -> String {
        const CLIENT: &str = "import socket, sys\n\
            s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n\
            s.sendall(sys.argv[3].encode())\n\
            got = b''\n\
            try:\n\
            \x20   while b'\\r\\n\\r\\n' not in got:\n\
            \x20       chunk = s.recv(4096)\n\
            \x20       if not chunk: break\n\
            \x20       got += chunk\n\
            except socket.timeout:\n\
            \x20   pass\n\
            print(got.decode(errors='replace'))\n";
        let out: Output = self
            .python(
                CLIENT,
                &[&addr.ip().to_string(), &addr.port().to_string(), request],
            )
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A TCP origin inside on 127.0.0.1:`port` and [::1]:`port` that reports each connection's
    /// peer address and closes it.
    pub fn peer_origin(&self, port: u16) -> NsOrigin {
        const ORIGIN: &str = "import socket, sys, threading\n\
            port = int(sys.argv[1])\n\
            def serve(family, host):\n\
            \x20   l = socket.socket(family)\n\
            \x20   l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
            \x20   l.bind((host, port))\n\
            \x20   l.listen(16)\n\
            \x20   while True:\n\
            \x20       c, peer = l.accept()\n\
            \x20       print(peer[0], flush=True)\n\
            \x20       c.close()\n\
            for family, host in ((socket.AF_INET, '127.0.0.1'), (socket.AF_INET6, '::1')):\n\
            \x20   threading.Thread(target=serve, args=(family, host), daemon=True).start()\n\
            print('ready', flush=True)\n\
            threading.Event().wait(120)\n";
        let mut child = self
            .python(ORIGIN, &[&port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, peers) = channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let origin = NsOrigin { child, peers };
        assert_eq!(origin.next().as_deref(), Some("ready"));
        origin
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The origin inside a namespace; stopped (its PID only) when dropped.
pub struct NsOrigin {
    child: Child,
    peers: Receiver<String>,
}

impl NsOrigin {
    /// The next peer address it saw, within 5 s.
    pub fn next(&self) -> Option<String> {
        self.peers.recv_timeout(Duration::from_secs(5)).ok()
    }

    /// A peer seen within `wait`, if any.
    pub fn seen_within(&self, wait: Duration) -> Option<String> {
        self.peers.recv_timeout(wait).ok()
    }
}

impl Drop for NsOrigin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
