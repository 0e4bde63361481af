//! The self-test's results: one line per check (`PASS|WARN|FAIL name: what was seen`,
//! and for WARN and FAIL a `  fix:` line), or one JSON document with `--json`.

use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// What was seen, in one line.
    pub seen: String,
    /// For WARN and FAIL: what to do, in one sentence.
    pub fix: Option<String>,
}

impl Check {
    pub fn pass(name: &'static str, seen: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Pass,
            seen: seen.into(),
            fix: None,
        }
    }

    pub fn warn(name: &'static str, seen: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Warn,
            seen: seen.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn fail(name: &'static str, seen: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Fail,
            seen: seen.into(),
            fix: Some(fix.into()),
        }
    }

    /// The text form: one line, plus the fix line for WARN and FAIL. Newlines in what a
    /// peer sent cannot break the one-line form.
    pub fn text(&self) -> String {
        let one_line = |s: &str| s.replace(['\r', '\n'], " ");
        let mut out = format!("{} {}: {}\n", self.status.label(), self.name, one_line(&self.seen));
        if let Some(fix) = &self.fix {
            out.push_str(&format!("  fix: {}\n", one_line(fix)));
        }
        out
    }
}

/// Every check of one run, in order, and the checks left out because one they need
/// failed.
#[derive(Debug, Default)]
pub struct Report {
    pub checks: Vec<Check>,
    pub skipped: Vec<(&'static str, String)>,
}

impl Report {
    pub fn add(&mut self, check: Check) -> Status {
        let status = check.status;
        self.checks.push(check);
        status
    }

    pub fn skip(&mut self, name: &'static str, why: impl Into<String>) {
        self.skipped.push((name, why.into()));
    }

    pub fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.status == Status::Fail)
    }

    fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }

    /// The closing summary line.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} passed, {} warnings, {} failed",
            self.count(Status::Pass),
            self.count(Status::Warn),
            self.count(Status::Fail)
        );
        if !self.skipped.is_empty() {
            let names: Vec<String> = self.skipped.iter().map(|(n, why)| format!("{n} ({why})")).collect();
            s.push_str(&format!("; not run: {}", names.join(", ")));
        }
        s
    }

    pub fn json(&self) -> String {
        let checks: Vec<_> = self
            .checks
            .iter()
            .map(|c| json!({"name": c.name, "status": c.status.label(), "seen": c.seen, "fix": c.fix}))
            .collect();
        let skipped: Vec<_> = self
            .skipped
            .iter()
            .map(|(n, why)| json!({"name": n, "why": why}))
            .collect();
        let doc = json!({
            "ok": !self.failed(),
            "passed": self.count(Status::Pass),
            "warnings": self.count(Status::Warn),
            "failed": self.count(Status::Fail),
            "checks": checks,
            "skipped": skipped,
        });
        format!("{doc:#}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_json() {
        let mut r = Report::default();
        r.add(Check::pass("local-ping", "pong"));
        r.add(Check::fail("public-websocket", "400\nfrom nginx", "set it"));
        r.skip("end-to-end", "the websocket did not open");
        assert_eq!(r.checks[0].text(), "PASS local-ping: pong\n");
        assert_eq!(
            r.checks[1].text(),
            "FAIL public-websocket: 400 from nginx\n  fix: set it\n"
        );
        assert!(r.failed());
        assert_eq!(
            r.summary(),
            "1 passed, 0 warnings, 1 failed; not run: end-to-end (the websocket did not open)"
        );
        let v: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["checks"][1]["fix"], "set it");
        assert_eq!(v["checks"][0]["fix"], serde_json::Value::Null);
    }
}
