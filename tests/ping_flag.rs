//! `--ping`: the health check of the container image (packaging/docker/). It must pass
//! only when a notification server answers `/ping` at the configured address.

mod common;

use common::*;
use std::io::{Read, Write};
use std::process::Output;

/// Runs `notification-server -c dir --ping` with the port (and host) taken from the
/// environment, as the image's HEALTHCHECK does.
fn ping(dir: &std::path::Path, host: &str, port: u16) -> Output {
    let mut cmd = binary();
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str()
            && (k.starts_with("NOTIFICATION_SERVER_") || k.starts_with("SEAFILE_") || k == "JWT_PRIVATE_KEY")
        {
            cmd.env_remove(k);
        }
    }
    cmd.args(["-c", dir.to_str().unwrap(), "--ping"])
        .env("NOTIFICATION_SERVER_HOST", host)
        .env("NOTIFICATION_SERVER_PORT", port.to_string())
        .output()
        .unwrap()
}

#[test]
fn ping_passes_against_a_running_server_and_fails_once_it_is_gone() {
    let mut server = Server::start("");
    let port = server.addr.port();
    // 0.0.0.0 (the image's listen address) is asked on loopback.
    let out = ping(server.dir.path(), "0.0.0.0", port);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("pong from 127.0.0.1:{port}\n")
    );

    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit(DEADLINE), Some(0));
    let out = ping(server.dir.path(), "127.0.0.1", port);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no answer to /ping"),
        "{out:?}"
    );
}

#[test]
fn ping_fails_when_something_else_answers() {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("seafile.conf"), config_text("")).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let other = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
    });
    let out = ping(dir.path(), "127.0.0.1", port);
    other.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("answered \"HTTP/1.1 503\""),
        "{out:?}"
    );
}

#[test]
fn ping_fails_on_a_bad_configuration() {
    let dir = TempDir::new(); // no key anywhere
    let out = ping(dir.path(), "127.0.0.1", free_port());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}
