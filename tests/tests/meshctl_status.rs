//! `meshctl status` / `services` / `peers` end to end: a two-cluster mesh started by
//! `meshctl up`, inspected over the components' mTLS gRPC API, then found down.

use std::time::{Duration, Instant};

use mesh_tests::meshctl::{MeshGuard, examples_dir, meshctl, text};
use serde_json::Value;

#[test]
fn status_services_and_peers_of_a_running_mesh() {
    let guard = MeshGuard {
        dir: tempfile::Builder::new()
            .prefix("meshctl-status-")
            .tempdir()
            .expect("temp dir"),
    };
    let dir = guard.dir.path().to_owned();
    let examples = examples_dir();
    let examples = examples.to_str().expect("utf-8 path");

    let up = meshctl(&["up", "--clusters", "2", "--examples", examples], &dir);
    assert!(up.status.success(), "meshctl up failed:\n{}", text(&up));
    assert!(
        dir.join("east/pki/meshctl.crt").exists(),
        "up issued no meshctl cert"
    );

    // status --wait: everything ready, both clusters named, each one's peer ready.
    let st = meshctl(&["status", "--wait", "--timeout", "60s"], &dir);
    assert!(st.status.success(), "meshctl status failed:\n{}", text(&st));
    let out = String::from_utf8_lossy(&st.stdout);
    assert!(out.contains("cluster east (id 1): ready"), "{}", text(&st));
    assert!(out.contains("cluster west (id 2): ready"), "{}", text(&st));
    assert!(
        out.contains("peer west (id 2): ready, connected"),
        "{}",
        text(&st)
    );
    assert!(
        out.contains("peer east (id 1): ready, connected"),
        "{}",
        text(&st)
    );
    assert!(
        out.contains("READY: all 2 cluster(s) ready"),
        "{}",
        text(&st)
    );
    assert!(out.contains("cert expires in"), "{}", text(&st));

    // JSON parses and says the same.
    let js = meshctl(&["status", "-o", "json"], &dir);
    assert!(js.status.success(), "status -o json failed:\n{}", text(&js));
    let v: Value = serde_json::from_slice(&js.stdout).expect("status -o json is JSON");
    assert_eq!(v["ready"], Value::Bool(true), "{v:#}");
    let clusters = v["clusters"].as_array().expect("clusters");
    let names: Vec<&str> = clusters.iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, ["east", "west"]);
    for c in clusters {
        assert_eq!(c["apiserver"]["ready"], Value::Bool(true), "{c:#}");
        assert_eq!(c["apiserver"]["etcdReachable"], Value::Bool(true), "{c:#}");
        assert_eq!(c["agent"]["ready"], Value::Bool(true), "{c:#}");
        let peers = c["peers"].as_array().expect("peers");
        assert_eq!(peers.len(), 1, "{c:#}");
        assert_eq!(peers[0]["state"], "ready", "{c:#}");
    }

    // peers: compact.
    let pe = meshctl(&["peers"], &dir);
    assert!(pe.status.success(), "meshctl peers failed:\n{}", text(&pe));
    let out = String::from_utf8_lossy(&pe.stdout);
    assert!(
        out.contains("east: 1 peer(s)") && out.contains("west: 1 peer(s)"),
        "{}",
        text(&pe)
    );

    // services: shop/web with backends of east and west and a ClusterSetIP.
    let deadline = Instant::now() + Duration::from_secs(30);
    let web = loop {
        let sv = meshctl(&["services", "-o", "json"], &dir);
        assert!(
            sv.status.success(),
            "meshctl services failed:\n{}",
            text(&sv)
        );
        let v: Value = serde_json::from_slice(&sv.stdout).expect("services -o json is JSON");
        let web = v
            .as_array()
            .expect("array")
            .iter()
            .find(|s| s["namespace"] == "shop" && s["name"] == "web")
            .cloned();
        let complete = web.as_ref().is_some_and(|w| {
            let with: Vec<&str> = w["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|b| b["total"].as_u64().unwrap_or(0) > 0)
                .filter_map(|b| b["cluster"].as_str())
                .collect();
            with.contains(&"east")
                && with.contains(&"west")
                && !w["clusterSetIp"].as_str().unwrap_or("").is_empty()
        });
        if complete {
            break web.expect("web");
        }
        assert!(Instant::now() < deadline, "shop/web incomplete: {v:#}");
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("shop/web: {web:#}");
    let sv = meshctl(&["services"], &dir);
    assert!(
        sv.status.success(),
        "meshctl services failed:\n{}",
        text(&sv)
    );
    let out = String::from_utf8_lossy(&sv.stdout);
    let line = out
        .lines()
        .find(|l| l.starts_with("shop/web "))
        .unwrap_or_else(|| panic!("no shop/web line:\n{}", text(&sv)));
    assert!(
        line.contains("clusterset-ip ") && !line.contains("<none>"),
        "{line}"
    );
    assert!(
        out.contains("east ") && out.contains("west "),
        "{}",
        text(&sv)
    );
    let sv = meshctl(&["services", "--cluster", "west"], &dir);
    assert!(
        sv.status.success(),
        "services --cluster west:\n{}",
        text(&sv)
    );
    assert!(
        String::from_utf8_lossy(&sv.stdout).contains("shop/web "),
        "{}",
        text(&sv)
    );

    // identities: both clusters' identities with their labels, as JSON and as a table.
    let id = meshctl(&["identities", "--cluster", "east", "-o", "json"], &dir);
    assert!(id.status.success(), "identities:\n{}", text(&id));
    let v: Value = serde_json::from_slice(&id.stdout).expect("identities -o json is JSON");
    let of = |c: &str| {
        v.as_array()
            .expect("array")
            .iter()
            .filter(|i| i["cluster"] == c)
            .count()
    };
    assert!(of("east") >= 5 && of("west") >= 5, "{v:#}");
    assert!(
        v.as_array().expect("array").iter().any(|i| i["labels"]
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x == "k8s:app=web"))),
        "{v:#}"
    );
    let id = meshctl(&["identities", "--cluster", "east", "--from", "west"], &dir);
    let out = String::from_utf8_lossy(&id.stdout);
    let rows: Vec<&str> = out.lines().skip(2).collect();
    assert!(
        !rows.is_empty() && rows.iter().all(|r| r.contains(" west ")),
        "{out}"
    );

    // -o yaml, colour (forced on, and NO_COLOR winning over the force), completions.
    let y = meshctl(&["status", "-o", "yaml"], &dir);
    let out = String::from_utf8_lossy(&y.stdout);
    assert!(
        out.contains("verdict: ") && out.contains("clusters:"),
        "{out}"
    );
    let kc = dir.join("kubeconfig");
    let kc = kc.to_str().expect("utf-8");
    let coloured = mesh_tests::meshctl::meshctl_env(
        &["status", "--kubeconfig", kc],
        &[("CLICOLOR_FORCE", "1")],
    );
    assert!(
        String::from_utf8_lossy(&coloured.stdout).contains("\u{1b}["),
        "CLICOLOR_FORCE gave no colour:\n{}",
        text(&coloured)
    );
    let plain = mesh_tests::meshctl::meshctl_env(
        &["status", "--kubeconfig", kc],
        &[("CLICOLOR_FORCE", "1"), ("NO_COLOR", "1")],
    );
    assert!(
        !String::from_utf8_lossy(&plain.stdout).contains('\u{1b}'),
        "NO_COLOR ignored:\n{}",
        text(&plain)
    );
    for shell in ["bash", "zsh", "fish"] {
        let c = mesh_tests::meshctl::meshctl_env(&["completion", shell], &[]);
        assert!(c.status.success(), "completion {shell}:\n{}", text(&c));
        let out = String::from_utf8_lossy(&c.stdout);
        assert!(
            out.contains("meshctl") && out.contains("disconnect"),
            "{shell}: {out}"
        );
    }

    // After down: not ready, non-zero, each cluster reported (no crash).
    let down = meshctl(&["down"], &dir);
    assert!(
        down.status.success(),
        "meshctl down failed:\n{}",
        text(&down)
    );
    let st = meshctl(&["status"], &dir);
    assert!(
        !st.status.success(),
        "status after down succeeded:\n{}",
        text(&st)
    );
    let out = String::from_utf8_lossy(&st.stdout);
    assert!(
        out.contains("UNREACHABLE") && out.contains("NOT READY"),
        "{}",
        text(&st)
    );
    assert!(
        out.contains("cluster east") && out.contains("cluster west"),
        "{}",
        text(&st)
    );
    drop(guard);
}
