//! Socket activation: the gateway serves on the listening sockets systemd hands it
//! (`systemd-socket-activate` here, Debian's systemd package), and a socket it was not meant to
//! take is a start error that says which. The tool is skipped where it is missing, except with
//! `CI` set.

use crate::support::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `systemd-socket-activate`, or `None` to skip (outside CI).
fn socket_activate() -> Option<&'static str> {
    const TOOL: &str = "/usr/bin/systemd-socket-activate";
    if std::path::Path::new(TOOL).exists() {
        return Some(TOOL);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI is set but {TOOL} is missing: .ci/run installs Debian's systemd package"
    );
    None
}

#[tokio::test]
async fn the_gateway_serves_on_the_sockets_systemd_hands_it() {
    let Some(tool) = socket_activate() else {
        return;
    };
    let origin = TcpOrigin::start(b"from the origin").await;
    let (proxy, admin) = (free_port(), free_port());
    let config = GatewayConfig::for_origin(origin.addr.port())
        .listen("proxy", [format!("127.0.0.1:{proxy}")])
        .listen("admin", format!("127.0.0.1:{admin}"));
    let proxy_arg = format!("127.0.0.1:{proxy}");
    let admin_arg = format!("127.0.0.1:{admin}");
    // The tool starts the gateway at the first client, which waits in the socket's queue.
    let first_client = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        open_tunnel(
            proxy_arg.parse().unwrap(),
            &format!("{ORIGIN_HOST}:{}", origin.addr.port()),
            b"",
        )
        .await
    };
    let wrapper = [
        tool,
        "-l",
        &proxy_arg,
        "-l",
        &admin_arg,
        "--fdname=proxy:admin",
    ];
    let (mut gw, (mut tunnel, status)) =
        tokio::join!(Gateway::start_under(config, &[], &wrapper), first_client);
    assert_eq!(
        status, 200,
        "the client queued before the gateway started is served"
    );
    assert_eq!(gw.addr.port(), proxy, "it listens on the passed socket");
    tunnel.write_all(b"ping").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut reply = Vec::new();
    tunnel.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"from the origin");
    let line = gw.access_line(|l| l["status"] == 200).await;
    assert_eq!(line["end"], "closed", "{line}");
    // The admin listener is the passed one too.
    let ready = admin_get(admin_arg.parse().unwrap(), "/readyz").await;
    assert_eq!(ready.status, 200);
}

/// Runs the gateway under the tool with `fdnames`, pokes the socket so the tool starts it, and
/// returns what the gateway said on stderr and whether it exited with failure.
async fn start_failure(config: &GatewayConfig, listen: &[&str], fdnames: &str) -> String {
    let tool = socket_activate().expect("checked by the caller");
    let (_dir, path) = temp_file("portcullis.toml", &config.to_string());
    let mut command = tokio::process::Command::new(tool);
    for address in listen {
        command.args(["-l", address]);
    }
    command
        .arg(format!("--fdname={fdnames}"))
        .arg(env!("CARGO_BIN_EXE_portcullis"))
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().unwrap();
    let poke = listen[0].to_owned();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = tokio::net::TcpStream::connect(poke).await;
    });
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("the gateway gives up at once")
        .unwrap();
    assert!(!out.status.success(), "it must not serve");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn a_socket_under_a_name_or_address_the_config_does_not_expect_stops_the_start() {
    if socket_activate().is_none() {
        return;
    }
    let proxy = format!("127.0.0.1:{}", free_port());
    let config = GatewayConfig::no_origin()
        .listen("proxy", [proxy.clone()])
        .listen("admin", "off");
    let said = start_failure(&config, &[&proxy], "web").await;
    assert!(
        said.contains("a socket named \"web\"")
            && said.contains("\"proxy\", \"tls-proxy\" and \"admin\""),
        "{said}"
    );
    // The config lists two proxy addresses; only one is passed.
    let other = format!("127.0.0.1:{}", free_port());
    let two = config
        .clone()
        .listen("proxy", [proxy.clone(), other.clone()]);
    let said = start_failure(&two, &[&proxy], "proxy").await;
    assert!(
        said.contains(&format!(
            "`listen.proxy` lists {other}, but no socket named \"proxy\" listens there"
        )),
        "{said}"
    );
    // An admin socket passed to a gateway whose admin listener is off.
    let admin = format!("127.0.0.1:{}", free_port());
    let said = start_failure(&config, &[&proxy, &admin], "proxy:admin").await;
    assert!(
        said.contains(&format!(
            "a socket named \"admin\" listens on {admin}, which `listen.admin` does not list"
        )),
        "{said}"
    );
}
