//! The systemd unit and the files packaged with it: `systemd-analyze verify` accepts the
//! unit without a single warning, it is a notify service with a watchdog that takes its
//! key from outside the unit, its command line is one this binary accepts, and every
//! file the Debian package ships exists.
//!
//! `.ci/deps` installs `systemd-analyze` (Debian package `systemd`). Where it is missing
//! the verify test is skipped with a message, except under CI (`CI` set), where it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

const UNIT: &str = include_str!("../systemd/notification-server.service");
const UNIT_NAME: &str = "notification-server.service";
const ENV_EXAMPLE: &str = include_str!("../systemd/notification-server.env.example");
const CARGO_TOML: &str = include_str!("../Cargo.toml");
const BIN: &str = env!("CARGO_BIN_EXE_notification-server");

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `(section, key, value)` of every assignment, comments and blank lines skipped.
fn entries(unit: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not an assignment: {line:?}"));
        out.push((section.clone(), key.trim().to_string(), value.trim().to_string()));
    }
    out
}

/// Every value of `key` in `[Service]`.
fn service(key: &str) -> Vec<String> {
    entries(UNIT)
        .into_iter()
        .filter(|(s, k, _)| s == "Service" && k == key)
        .map(|(_, _, v)| v)
        .collect()
}

fn one(key: &str) -> String {
    let values = service(key);
    assert_eq!(
        values.len(),
        1,
        "[Service] {key}= should be set exactly once: {values:?}"
    );
    values[0].clone()
}

/// A fresh temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!("ns-systemd-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The unit with `ExecStart=` pointing at the binary under test (the installed path
/// `/usr/bin/notification-server` does not exist here, and verify checks it).
fn unit_for_this_build() -> String {
    let exec = one("ExecStart");
    let installed = exec.split_whitespace().next().unwrap();
    assert_eq!(installed, "/usr/bin/notification-server");
    UNIT.replace(&format!("ExecStart={installed} "), &format!("ExecStart={BIN} "))
}

/// Runs `systemd-analyze verify` on `unit` written as `notification-server.service` in a
/// temporary directory; returns success and the combined output.
fn verify(analyze: &Path, unit: &str) -> (bool, String) {
    let dir = TempDir::new("verify");
    let path = dir.0.join(UNIT_NAME);
    std::fs::write(&path, unit).unwrap();
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&path)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .expect("run systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The lines of verify's output about our unit: unknown keys and sections, values it
/// could not parse and ignored, missing executables. Lines about other units on the
/// machine (network.target and friends) are not ours to fix.
fn complaints(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter(|l| l.contains("notification-server"))
        .filter(|l| !l.trim().is_empty())
        .collect()
}

#[test]
fn systemd_analyze_verify_accepts_the_unit_without_warnings() {
    let Some(analyze) = find_in_path("systemd-analyze") else {
        if std::env::var_os("CI").is_some() {
            panic!("systemd-analyze is missing under CI: .ci/deps should install the systemd package");
        }
        eprintln!("skipped: systemd-analyze not installed (run .ci/deps)");
        return;
    };
    // First make sure this systemd-analyze reports what we look for, so that a clean
    // run below means something: an unknown key and an unknown service type.
    let broken = unit_for_this_build().replace("[Service]\n", "[Service]\nNoSuchKeyForTheTest=1\n");
    let (_, text) = verify(&analyze, &broken);
    assert!(
        complaints(&text).iter().any(|l| l.contains("NoSuchKeyForTheTest")),
        "systemd-analyze did not report an unknown key; output:\n{text}"
    );

    let (ok, text) = verify(&analyze, &unit_for_this_build());
    let ours = complaints(&text);
    assert!(ok, "systemd-analyze verify failed:\n{text}");
    assert!(
        ours.is_empty(),
        "systemd-analyze verify complained:\n{}",
        ours.join("\n")
    );
}

#[test]
fn unit_is_a_notify_service_with_watchdog_reload_and_restart() {
    let kind = one("Type");
    assert!(kind == "notify" || kind == "notify-reload", "Type={kind}");
    if kind == "notify" {
        assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    } else {
        assert_eq!(service("ReloadSignal"), ["SIGHUP"]);
    }
    assert!(!one("WatchdogSec").is_empty());
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("LimitNOFILE"), "65536");
    assert_eq!(one("CapabilityBoundingSet"), "", "no capabilities at all");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("UMask"), "0077");
    assert!(
        service("ReadOnlyPaths")
            .iter()
            .any(|p| p.trim_start_matches('-') == "/etc/seafile-notification")
    );
    // Logs go to the journal.
    let exec = one("ExecStart");
    assert!(exec.ends_with(" -l -"), "ExecStart={exec}");
}

#[test]
fn the_key_comes_from_outside_the_unit() {
    let from_file = service("EnvironmentFile");
    let credential = service("LoadCredential");
    assert!(
        !from_file.is_empty() || !credential.is_empty(),
        "the key must come from EnvironmentFile= or LoadCredential="
    );
    assert!(!UNIT.contains("JWT_PRIVATE_KEY="), "the unit must not assign the key");
    for value in service("Environment") {
        assert!(!value.contains("JWT_PRIVATE_KEY"), "Environment={value}");
    }
    // The example environment file shows the format with an obviously fake key, and
    // leaves it commented out, so a copy that nobody edited fails loudly at start
    // ("jwt_private_key: missing") instead of running with a wrong key.
    let assignments: Vec<&str> = ENV_EXAMPLE
        .lines()
        .map(str::trim)
        .filter(|l| l.trim_start_matches('#').starts_with("JWT_PRIVATE_KEY="))
        .collect();
    assert!(!assignments.is_empty(), "the example should show the key's format");
    for line in assignments {
        assert!(line.starts_with('#'), "example key not commented out: {line}");
        assert!(line.contains("EXAMPLE"), "example key does not look fake: {line}");
    }
}

#[test]
fn exec_start_command_line_is_accepted_by_the_binary() {
    // The unit's arguments, with the config directory swapped for the packaged config.
    let exec = one("ExecStart");
    let mut args: Vec<String> = exec.split_whitespace().skip(1).map(String::from).collect();
    let c = args.iter().position(|a| a == "-c").expect("ExecStart has -c DIR");
    assert_eq!(args[c + 1], "/etc/seafile-notification");
    let packaged = root().join("packaging/conf");
    args[c + 1] = packaged.display().to_string();
    args.push("--check-config".into());

    // The packaged seafile.conf carries no key: without one the start must fail clearly.
    let out = Command::new(BIN)
        .args(&args)
        .env_remove("JWT_PRIVATE_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("jwt_private_key: missing"), "stderr: {stderr}");

    // With the key from the environment (as the EnvironmentFile supplies it): accepted.
    let out = Command::new(BIN)
        .args(&args)
        .env("JWT_PRIVATE_KEY", "EXAMPLE-ONLY-test-key")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), "configuration OK: would listen on 127.0.0.1:8083");
}

#[test]
fn every_file_the_debian_package_ships_exists() {
    let start = CARGO_TOML
        .find("[package.metadata.deb]")
        .expect("Cargo.toml has [package.metadata.deb]");
    let deb = &CARGO_TOML[start..];
    let deb = &deb[..deb[1..].find("\n[").map(|i| i + 1).unwrap_or(deb.len())];
    let assets = &deb[deb.find("assets").expect("assets")..];
    let assets = &assets[..assets.find("\n]").expect("end of assets")];
    let mut sources = Vec::new();
    for line in assets.lines().filter(|l| l.trim_start().starts_with("[\"")) {
        let source = line.trim_start().trim_start_matches("[\"");
        sources.push(source[..source.find('"').unwrap()].to_string());
    }
    assert!(
        sources.iter().any(|s| s == "systemd/notification-server.service"),
        "{sources:?}"
    );
    for source in sources.iter().filter(|s| !s.starts_with("target/")) {
        assert!(root().join(source).is_file(), "packaged file {source} is missing");
    }
    for script in ["postinst", "prerm", "postrm"] {
        let path = root().join("packaging/debian").join(script);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(text.starts_with("#!/bin/sh"), "{script} has no shebang");
        assert!(text.contains("set -e"), "{script} should stop on errors");
    }
}
