//! A privileged test that cannot run skips loudly outside CI and fails under
//! `MESHD_REQUIRE_PRIVILEGED` (what `.ci/run` sets): checked by rerunning this test
//! without privileges (as `nobody` when this runs as root).

use std::process::Command;

use mesh_tests::lab::{PRIVILEGED_LOG_ENV, REQUIRE_PRIVILEGED_ENV, is_root};

const CHILD: &str = "MESHD_TEST_PRIVILEGE_PROBE";
const TEST: &str = "a_privileged_test_skips_loudly_or_fails_when_required";

/// Runs the probe unprivileged; returns (success, output, privileged log).
fn probe(require: bool) -> (bool, String, String) {
    let log = tempfile::NamedTempFile::new().expect("temp file");
    // The log must be writable by `nobody`.
    std::fs::set_permissions(
        log.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .expect("chmod");
    let exe = std::env::current_exe().expect("test binary");
    let mut cmd = if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    cmd.args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env(PRIVILEGED_LOG_ENV, log.path())
        .env_remove(REQUIRE_PRIVILEGED_ENV);
    if require {
        cmd.env(REQUIRE_PRIVILEGED_ENV, "1");
    }
    let out = cmd
        .output()
        .expect("run the probe (setpriv from util-linux)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let logged = std::fs::read_to_string(log.path()).unwrap_or_default();
    (out.status.success(), text, logged)
}

#[test]
fn a_privileged_test_skips_loudly_or_fails_when_required() {
    if std::env::var_os(CHILD).is_some() {
        // The probe: this same test, rerun without privileges by the code below.
        mesh_tests::require_root!("privilege_probe");
        panic!("the probe ran although it lacks privileges");
    }
    let (ok, text, logged) = probe(false);
    assert!(ok, "without the requirement the probe skips: {text}");
    assert!(
        text.contains("SKIPPED privilege_probe: needs root"),
        "{text}"
    );
    assert!(logged.starts_with("SKIPPED privilege_probe"), "{logged}");

    let (ok, text, _) = probe(true);
    assert!(
        !ok,
        "under {REQUIRE_PRIVILEGED_ENV} the probe fails: {text}"
    );
    assert!(
        text.contains("may not pass by skipping here"),
        "the failure says why: {text}"
    );
}
