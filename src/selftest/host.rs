//! The self-test's checks of what the server leans on: the group database, the Redis
//! bus, and the box (open files, memory, clock).

use super::Ctx;
use super::client::{self, Url};
use super::report::Check;
use std::time::{Duration, Instant};

/// Memory the process needs besides its output budget: connections, buffers, the
/// binary itself, with room to spare.
const WORKING_MARGIN: u64 = 32 << 20;

/// Connections below which the open-file limit is flagged.
const FEW_CONNECTIONS: u64 = 1024;

/// `group-database`, when one is configured: a group query is answered.
pub(super) fn group_database(ctx: &Ctx) -> Option<Check> {
    let backend = ctx.loaded.backend.as_ref()?;
    let started = Instant::now();
    Some(
        match crate::groups::query_once(backend, 0, ctx.loaded.config.group_lookup_timeout) {
            Ok(n) => Check::pass(
                "group-database",
                format!(
                    "the {} answered a group query in {} ({n} members in group 0)",
                    backend.describe(),
                    super::millis(started.elapsed())
                ),
            ),
            Err(e) => Check::fail(
                "group-database",
                format!("the {} did not answer a group query: {e}", backend.describe()),
                "Fix the database settings (SEAFILE_MYSQL_DB_* in Seafile 12/13, ccnet.conf [Database] in 10/11, \
                 or groupmgr_db for SQLite) and make the database readable by the server's user",
            ),
        },
    )
}

/// `redis-bus`, when one is configured: a message published on the channel reaches a
/// subscriber, and, with the server running, comes back through its websocket.
pub(super) fn redis_bus(ctx: &Ctx, server_up: bool) -> Option<Check> {
    let url = ctx.loaded.config.redis_url.as_deref()?;
    let channel = &ctx.loaded.config.redis_channel;
    // Never show the password: only what follows the '@'.
    let shown = url
        .rsplit_once('@')
        .map_or(url.to_string(), |(_, host)| host.to_string());
    let fix =
        "Start Redis, or fix redis_url (NOTIFICATION_SERVER_REDIS_URL) so that every instance uses the same Redis";
    let mut conn = match redis::Client::open(url).and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2))) {
        Ok(c) => c,
        Err(e) => {
            return Some(Check::fail(
                "redis-bus",
                format!("cannot reach Redis at {shown}: {e}"),
                fix,
            ));
        }
    };
    let mut ws = None;
    if server_up
        && let Some(local) = ctx.local
        && let Ok(mut socket) = client::websocket(&Url::local(local), &ctx.tls, "/")
        && super::public::subscribe(ctx, &mut socket).is_ok()
    {
        ws = Some(socket);
    }
    let body = super::local::test_event(&ctx.repo);
    let crate::event::Parsed::Event(event) = crate::event::parse(body.as_bytes()) else {
        return Some(Check::fail("redis-bus", "internal: the test event does not parse", fix));
    };
    let sender = format!("self-test-{}", ctx.repo);
    let Some(message) = crate::bus::encode(&sender, &event, None) else {
        return Some(Check::fail(
            "redis-bus",
            "internal: the test event does not encode",
            fix,
        ));
    };
    let started = Instant::now();
    let receivers: i64 = match redis::cmd("PUBLISH").arg(channel).arg(message).query(&mut conn) {
        Ok(n) => n,
        Err(e) => return Some(Check::fail("redis-bus", format!("PUBLISH on {shown}: {e}"), fix)),
    };
    if receivers == 0 {
        return Some(Check::fail(
            "redis-bus",
            format!("Redis at {shown} answers, but no server is subscribed to channel {channel:?}"),
            "Give every instance the same redis_url and redis_channel, and restart them (the bus is set at start)",
        ));
    }
    let Some(mut ws) = ws else {
        return Some(Check::pass(
            "redis-bus",
            format!(
                "published on Redis at {shown}, channel {channel:?}: {receivers} subscribers (the local server was not asked)"
            ),
        ));
    };
    let mut pings = 0;
    let result = super::public::receive_event(&mut ws, &ctx.repo, super::ROUND_TRIP_LIMIT, &mut pings);
    let _ = ws.close(None);
    let _ = ws.flush();
    Some(match result {
        Ok(()) => Check::pass(
            "redis-bus",
            format!(
                "a message published on Redis at {shown}, channel {channel:?} ({receivers} subscribers), came back \
                 through this server's websocket in {}",
                super::millis(started.elapsed())
            ),
        ),
        Err(e) => Check::fail(
            "redis-bus",
            format!(
                "published on channel {channel:?} ({receivers} subscribers), but this server did not deliver it: {e}"
            ),
            "Give this server the same redis_url and redis_channel as the others, and restart it (the bus is set at start)",
        ),
    })
}

/// `open-files`, `memory` and, with the proxy's `Date`, `clock`.
pub(super) fn the_box(ctx: &Ctx, proxy_skew: Option<i64>) -> Vec<Check> {
    let pid = ctx.local.and_then(|a| server_pid(a.port()));
    let mut checks = vec![open_files(ctx, pid), memory(ctx, pid)];
    if let Some(skew) = proxy_skew {
        checks.push(clock(skew));
    }
    checks
}

fn open_files(ctx: &Ctx, pid: Option<u32>) -> Check {
    let c = &ctx.loaded.config;
    let (limit, whose) = match pid.and_then(|p| process_nofile(p).map(|l| (l, p))) {
        Some((l, p)) => (l, format!("the server's, pid {p}")),
        None => match own_hard_nofile() {
            Some(l) => (
                l,
                "this shell's hard limit, which the server raises itself to (its process was not found: run as its user or root)"
                    .to_string(),
            ),
            None => return Check::warn("open-files", "cannot read the open-file limit", "Run as the server's user"),
        },
    };
    let room = limit.saturating_sub(crate::config::RESERVED_DESCRIPTORS);
    let fix = "Raise the open-file limit (systemd LimitNOFILE=65536, docker --ulimit nofile=65536:65536) and restart";
    if c.max_connections_explicit && c.max_connections as u64 > room {
        return Check::warn(
            "open-files",
            format!(
                "max_connections is {} but the open-file limit {limit} ({whose}) leaves room for {room}",
                c.max_connections
            ),
            format!("{fix}, or lower max_connections"),
        );
    }
    if !c.max_connections_explicit && room < FEW_CONNECTIONS {
        return Check::warn(
            "open-files",
            format!("the open-file limit {limit} ({whose}) leaves room for only {room} connections"),
            fix,
        );
    }
    let cap = if c.max_connections_explicit {
        format!("max_connections {}", c.max_connections)
    } else {
        format!("max_connections derived from it: {room}")
    };
    Check::pass("open-files", format!("open-file limit {limit} ({whose}); {cap}"))
}

fn memory(ctx: &Ctx, pid: Option<u32>) -> Check {
    let c = &ctx.loaded.config;
    let machine = meminfo_total();
    let cgroup = cgroup_memory_limit(pid);
    let (limit, whose) = match (cgroup, machine) {
        (Some(g), Some(m)) if g < m => (g, "its cgroup's memory limit"),
        (_, Some(m)) => (m, "the machine's memory"),
        (Some(g), None) => (g, "its cgroup's memory limit"),
        (None, None) => {
            return Check::warn(
                "memory",
                "cannot read the memory limit",
                "Run on Linux with /proc mounted",
            );
        }
    };
    let need = c.max_output_bytes as u64 + WORKING_MARGIN;
    let seen = format!(
        "the process may use {} ({whose}); max_output_bytes {} plus a {} working margin needs {}",
        mib(limit),
        mib(c.max_output_bytes as u64),
        mib(WORKING_MARGIN),
        mib(need)
    );
    if limit < need {
        Check::warn(
            "memory",
            seen,
            format!(
                "Lower max_output_bytes to at most {} or raise the memory limit (systemd MemoryMax=, docker --memory)",
                mib(limit.saturating_sub(WORKING_MARGIN))
            ),
        )
    } else {
        Check::pass("memory", seen)
    }
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

/// `clock`: the proxy's `Date` against this box's clock; tokens carry wall-clock expiry
/// (seaf-server's live 5 minutes).
fn clock(skew: i64) -> Check {
    let fix = "Set the clocks with NTP (timedatectl set-ntp true); a Raspberry Pi without a real-time clock must get \
               the time before Seafile starts";
    let seen = format!("the proxy's clock is {skew:+} s from this box's (its Date header)");
    match skew.abs() {
        0..=30 => Check::pass("clock", seen),
        31..=299 => Check::warn("clock", seen, fix),
        _ => Check::fail(
            "clock",
            format!("{seen}: tokens signed on one are expired on the other"),
            fix,
        ),
    }
}

/// The process listening on `port` (TCP, IPv4 or IPv6), found through its socket's inode.
fn server_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let listening = *state == "0A";
            let this_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if listening && this_port {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && inodes.iter().any(|i| target.as_os_str() == i.as_str())
            {
                return Some(pid);
            }
        }
    }
    None
}

/// The soft open-file limit of a process (what it may use), from /proc/PID/limits.
fn process_nofile(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.split_whitespace().nth(3)?;
    Some(if soft == "unlimited" {
        u64::MAX
    } else {
        soft.parse().ok()?
    })
}

fn own_hard_nofile() -> Option<u64> {
    crate::process_stats::nofile_limits().map(|(_, hard)| hard)
}

fn meminfo_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = text
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The memory limit of the cgroup of `pid` (or of this process), v2 or v1; None when
/// unlimited or unknown.
fn cgroup_memory_limit(pid: Option<u32>) -> Option<u64> {
    let who = pid.map_or("self".to_string(), |p| p.to_string());
    let text = std::fs::read_to_string(format!("/proc/{who}/cgroup")).ok()?;
    let parse = |s: String| s.trim().parse::<u64>().ok().filter(|n| *n < (1 << 60));
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if controllers.is_empty() {
            // v2: the path may be hidden inside a container ("/"): try it, then the root.
            for dir in [format!("/sys/fs/cgroup{path}"), "/sys/fs/cgroup".to_string()] {
                if let Some(n) = std::fs::read_to_string(format!("{dir}/memory.max"))
                    .ok()
                    .and_then(parse)
                {
                    return Some(n);
                }
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            for dir in [
                format!("/sys/fs/cgroup/memory{path}"),
                "/sys/fs/cgroup/memory".to_string(),
            ] {
                if let Some(n) = std::fs::read_to_string(format!("{dir}/memory.limit_in_bytes"))
                    .ok()
                    .and_then(parse)
                {
                    return Some(n);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_skew_grades() {
        assert_eq!(clock(2).status, super::super::report::Status::Pass);
        assert_eq!(clock(-90).status, super::super::report::Status::Warn);
        assert_eq!(clock(400).status, super::super::report::Status::Fail);
    }

    #[test]
    fn finds_the_process_listening_on_a_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(server_pid(port), Some(std::process::id()));
        assert!(process_nofile(std::process::id()).is_some());
    }
}
