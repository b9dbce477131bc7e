//! The Kubernetes manifests under `deploy/kubernetes/`: valid against the Kubernetes API schemas
//! (PyPI's `kubernetes-validate`, strict), and consistent with each other and with the image's
//! config (ports, labels, probe paths, the admin token's mount).

use std::path::{Path, PathBuf};

use crm_quota_proxy::config::Config;
use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

fn manifest(name: &str) -> Value {
    let text = std::fs::read_to_string(dir().join(name)).unwrap();
    yaml_serde::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn the_manifests_pass_the_kubernetes_schemas() {
    let python = std::env::var("CRM_PROXY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let kustomization = manifest("kustomization.yaml");
    let files: Vec<PathBuf> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| dir().join(r.as_str().unwrap()))
        .collect();
    let out = std::process::Command::new(&python)
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(&files)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("No module named kubernetes_validate"),
        "this test validates the manifests with PyPI's kubernetes-validate, and {python} does not have it: \
         `python3 -m pip install kubernetes-validate`, or set CRM_PROXY_TEST_PYTHON to a Python that has it"
    );
    assert!(out.status.success(), "{text}");
    // The built-in kinds are checked against their schemas; the ServiceMonitor (a CRD) below.
    for kind in ["statefulset", "service", "networkpolicy"] {
        assert!(
            text.contains(&format!("passed for resource {kind}/")),
            "{text}"
        );
    }
}

#[test]
fn the_manifests_agree_with_each_other_and_with_the_images_config() {
    let sts = manifest("statefulset.yaml");
    let svc = manifest("service.yaml");
    let policy = manifest("networkpolicy.yaml");
    let monitor = manifest("servicemonitor.yaml");
    let pod = &sts["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    for (what, selector) in [
        ("statefulset", &sts["spec"]["selector"]["matchLabels"]),
        ("service", &svc["spec"]["selector"]),
        (
            "networkpolicy",
            &policy["spec"]["podSelector"]["matchLabels"],
        ),
        (
            "servicemonitor",
            &monitor["spec"]["selector"]["matchLabels"],
        ),
    ] {
        for (k, v) in selector.as_object().unwrap() {
            let target = if what == "servicemonitor" {
                &svc["metadata"]["labels"]
            } else {
                labels
            };
            assert_eq!(&target[k], v, "{what} selects {k}={v}");
        }
    }
    let proxy = pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "crm-quota-proxy")
        .unwrap();
    let port = |name: &str| {
        proxy["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["containerPort"]
            .as_u64()
            .unwrap()
    };
    // The image's config: what the pod runs.
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/zendesk-container.yaml"),
    )
    .unwrap();
    let config = Config::from_yaml(&text, None).unwrap();
    assert_eq!(u64::from(config.listen.admin.port()), port("admin"));
    assert_eq!(u64::from(config.listen.data.port()), port("crm"));
    assert!(
        config.listen.admin.ip().is_unspecified(),
        "probes reach the admin port"
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        let path = proxy[probe]["httpGet"]["path"].as_str().unwrap();
        assert!(
            config.listen.admin_open.iter().any(|p| p == path),
            "{probe} {path} needs no token"
        );
    }
    let mounts = proxy["volumeMounts"].as_array().unwrap();
    let mounted = |path: &Path| {
        mounts
            .iter()
            .any(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
    };
    assert!(
        mounted(config.listen.admin_token_file.as_deref().unwrap()),
        "the admin token is mounted"
    );
    assert!(
        mounted(config.queue.data_dir.as_deref().unwrap()),
        "the data directory is a volume"
    );
    // Prometheus scrapes the Service's admin port, the one the NetworkPolicy lets in.
    let endpoint = &monitor["spec"]["endpoints"][0];
    let svc_port = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == endpoint["port"])
        .expect("the ServiceMonitor's port is the Service's");
    assert_eq!(svc_port["port"].as_u64(), Some(port("admin")));
    assert!(
        config
            .listen
            .admin_open
            .iter()
            .any(|p| p == endpoint["path"].as_str().unwrap())
    );
    let allowed: Vec<u64> = policy["spec"]["ingress"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    assert_eq!(
        allowed,
        [port("admin")],
        "only the admin port is reachable from outside the pod"
    );
}
