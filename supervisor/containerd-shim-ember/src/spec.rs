//! What the shim reads from a bundle's OCI `config.json`: whether it is a
//! pod sandbox, the pod it belongs to, its network namespace, its limits.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

/// CRI's annotation telling a pod sandbox from an app container.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation naming the pod sandbox a container belongs to.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// The annotations passed on to emberd as labels, under the kubelet's label names.
const LABELS: &[(&str, &str)] = &[
    (
        "io.kubernetes.cri.sandbox-namespace",
        "io.kubernetes.pod.namespace",
    ),
    ("io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"),
    (
        "io.kubernetes.cri.container-name",
        "io.kubernetes.container.name",
    ),
    (
        "io.kubernetes.cri.sandbox-id",
        "io.kubernetes.pod.sandbox-id",
    ),
];

/// A container's network namespace as the spec asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// No network namespace entry: the host's network.
    Host,
    /// Join this existing namespace file.
    Join(String),
    /// A network entry without a path: a new, empty namespace (not supported).
    New,
}

/// Limits from `linux.resources`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// `memory.limit`, bytes (only when positive).
    pub memory_max: Option<i64>,
    /// `cpu.quota / cpu.period`, cores (only when both are positive).
    pub cpu: Option<f64>,
}

/// The parts of a bundle's spec the shim uses.
#[derive(Debug, Clone, PartialEq)]
pub struct BundleSpec {
    /// A CRI pod sandbox (the "pause" container): runs no process here.
    pub sandbox: bool,
    /// The pod sandbox id (for a sandbox: its own id), when CRI says.
    pub sandbox_id: Option<String>,
    pub network: Network,
    pub limits: Limits,
    /// Kubernetes names of the container, as labels for emberd.
    pub labels: HashMap<String, String>,
    /// `process.terminal`.
    pub terminal: bool,
}

/// Reads `<bundle>/config.json`.
pub fn read(bundle: &Path) -> Result<BundleSpec, String> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let v: Value = serde_json::from_slice(&text)
        .map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    parse(&v).map_err(|e| format!("{}: {e}", path.display()))
}

/// The pod sandbox id of the bundle in `dir` (used to group one shim per
/// pod), if its spec names one.
pub fn sandbox_id_of(dir: &Path) -> Option<String> {
    read(dir).ok().and_then(|s| s.sandbox_id)
}

/// Parses an OCI runtime spec.
pub fn parse(v: &Value) -> Result<BundleSpec, String> {
    if !v.is_object() {
        return Err("the OCI spec is not a JSON object".into());
    }
    let annotations = v.get("annotations").and_then(Value::as_object);
    let annotation = |k: &str| {
        annotations
            .and_then(|a| a.get(k))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let sandbox = annotation(CONTAINER_TYPE).as_deref() == Some("sandbox");
    let sandbox_id = annotation(SANDBOX_ID);
    let labels = LABELS
        .iter()
        .filter_map(|(from, to)| annotation(from).map(|v| (to.to_string(), v)))
        .collect();
    let linux = v.get("linux");
    let mut network = Network::Host;
    if let Some(namespaces) = linux.and_then(|l| l.get("namespaces")) {
        let namespaces = namespaces
            .as_array()
            .ok_or("linux.namespaces is not a list")?;
        for ns in namespaces {
            if ns.get("type").and_then(Value::as_str) == Some("network") {
                network = match ns.get("path").and_then(Value::as_str) {
                    Some(p) if !p.is_empty() => Network::Join(p.to_string()),
                    _ => Network::New,
                };
            }
        }
    }
    let limits = match linux.and_then(|l| l.get("resources")) {
        Some(r) => limits(r)?,
        None => Limits::default(),
    };
    let terminal = v
        .get("process")
        .and_then(|p| p.get("terminal"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(BundleSpec {
        sandbox,
        sandbox_id,
        network,
        limits,
        labels,
        terminal,
    })
}

/// Limits from an OCI `LinuxResources` object (`linux.resources` of a spec,
/// or the resources of an Update).
///
/// CPU: only a quota (`cpu.quota / cpu.period` cores) is a limit. CPU
/// shares come from a pod's *request*, which is a weight, not a cap: turning
/// them into a limit would cap a pod that asked for 100m at 0.1 core (and a
/// best-effort pod, shares 2, at 0.002 core), so they are not passed on.
pub fn limits(r: &Value) -> Result<Limits, String> {
    if !r.is_object() {
        return Err("linux.resources is not an object".into());
    }
    let int = |v: Option<&Value>, what: &str| -> Result<Option<i64>, String> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .or_else(|| v.as_u64().map(|u| i64::try_from(u).unwrap_or(i64::MAX)))
                .map(Some)
                .ok_or_else(|| format!("linux.resources.{what} is not an integer: {v}")),
        }
    };
    let memory = r.get("memory");
    let memory_max = int(memory.and_then(|m| m.get("limit")), "memory.limit")?.filter(|m| *m > 0);
    let cpu = r.get("cpu");
    let quota = int(cpu.and_then(|c| c.get("quota")), "cpu.quota")?;
    let period = int(cpu.and_then(|c| c.get("period")), "cpu.period")?;
    let cpu = match (quota, period) {
        (Some(q), Some(p)) if q > 0 && p > 0 => Some(q as f64 / p as f64),
        // The kernel's default period when only a quota is given.
        (Some(q), None) if q > 0 => Some(q as f64 / 100_000.0),
        _ => None,
    };
    Ok(Limits { memory_max, cpu })
}

/// The network namespace to hand emberd for an app container.
///
/// CRI gives a pod's app containers the sandbox's namespaces as
/// `/proc/<sandbox pid>/ns/net`; the sandbox pid this shim reported is its
/// own (a sandbox runs no process), so that path is the shim's namespace,
/// not the pod's: it is replaced by the namespace the sandbox's own spec
/// named (`None` for a host-network pod).
pub fn container_netns(
    network: &Network,
    shim_pid: u32,
    sandbox_netns: Option<Option<&str>>,
) -> Result<Option<String>, String> {
    match network {
        Network::Host => Ok(None),
        Network::New => Err(
            "a new network namespace (a linux.namespaces network entry without a path) is not \
             supported: an Ember module joins an existing namespace (a pod's) or uses the host \
             network (ctr run: --net-host)"
                .into(),
        ),
        Network::Join(path) if *path == format!("/proc/{shim_pid}/ns/net") => match sandbox_netns {
            Some(ns) => Ok(ns.map(str::to_string)),
            None => Err(format!(
                "the network namespace {path} is this shim's own: its pod sandbox is unknown here"
            )),
        },
        Network::Join(path) => Ok(Some(path.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The sandbox spec containerd 1.6's CRI wrote for a host-network pod (trimmed).
    fn sandbox_host_net() -> Value {
        json!({
            "ociVersion": "1.0.2-dev",
            "process": {"user": {"uid": 65535, "gid": 65535}, "args": ["/ember-module"], "cwd": "/"},
            "root": {"path": "rootfs", "readonly": true},
            "annotations": {
                "io.kubernetes.cri.container-type": "sandbox",
                "io.kubernetes.cri.sandbox-id": "5f1c0ffee",
                "io.kubernetes.cri.sandbox-name": "web-0",
                "io.kubernetes.cri.sandbox-namespace": "default",
                "io.kubernetes.cri.sandbox-log-directory": "/var/log/pods/default_web-0_1"
            },
            "linux": {
                "resources": {"cpu": {"shares": 2}},
                "cgroupsPath": "/k8s.io/5f1c0ffee",
                "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "mount"}]
            }
        })
    }

    #[test]
    fn a_cri_sandbox_is_recognised_and_a_host_network_pod_has_no_netns() {
        let s = parse(&sandbox_host_net()).unwrap();
        assert!(s.sandbox);
        assert_eq!(s.sandbox_id.as_deref(), Some("5f1c0ffee"));
        assert_eq!(s.network, Network::Host);
        assert_eq!(s.limits, Limits::default(), "shares alone are no limit");
        assert_eq!(s.labels["io.kubernetes.pod.name"], "web-0");
        assert_eq!(s.labels["io.kubernetes.pod.namespace"], "default");
    }

    #[test]
    fn a_pod_network_sandbox_records_its_namespace_file() {
        let mut v = sandbox_host_net();
        v["linux"]["namespaces"] = json!([{"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1234"}, {"type": "mount"}]);
        assert_eq!(
            parse(&v).unwrap().network,
            Network::Join("/var/run/netns/cni-1234".into())
        );
    }

    #[test]
    fn an_app_container_is_not_a_sandbox_and_carries_its_limits() {
        let v = json!({
            "process": {"args": ["/ember-module"], "terminal": false},
            "annotations": {
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.sandbox-id": "5f1c0ffee",
                "io.kubernetes.cri.container-name": "greeter"
            },
            "linux": {
                "resources": {"memory": {"limit": 67108864},
                              "cpu": {"shares": 512, "quota": 50000, "period": 100000}},
                "namespaces": [{"type": "network", "path": "/proc/77/ns/net"}]
            }
        });
        let s = parse(&v).unwrap();
        assert!(!s.sandbox);
        assert_eq!(s.sandbox_id.as_deref(), Some("5f1c0ffee"));
        assert_eq!(
            s.limits,
            Limits {
                memory_max: Some(64 << 20),
                cpu: Some(0.5)
            }
        );
        assert_eq!(s.labels["io.kubernetes.container.name"], "greeter");
        assert_eq!(s.network, Network::Join("/proc/77/ns/net".into()));
        assert!(!s.terminal);
    }

    #[test]
    fn a_plain_ctr_spec_without_annotations_is_an_app_container() {
        let v = json!({"process": {"args": ["/ember-module"], "terminal": true},
                       "linux": {"namespaces": [{"type": "network"}]}});
        let s = parse(&v).unwrap();
        assert!(!s.sandbox && s.sandbox_id.is_none() && s.labels.is_empty());
        assert_eq!(s.network, Network::New);
        assert!(s.terminal);
    }

    #[test]
    fn resources_map_to_limits() {
        let l = |v| limits(&v).unwrap();
        assert_eq!(l(json!({})), Limits::default());
        assert_eq!(l(json!({"memory": {"limit": 0}})).memory_max, None);
        assert_eq!(
            l(json!({"memory": {"limit": -1}})).memory_max,
            None,
            "-1 is unlimited"
        );
        assert_eq!(
            l(json!({"cpu": {"quota": 150000, "period": 100000}})).cpu,
            Some(1.5)
        );
        assert_eq!(l(json!({"cpu": {"quota": -1, "period": 100000}})).cpu, None);
        assert_eq!(l(json!({"cpu": {"quota": 20000}})).cpu, Some(0.2));
        assert_eq!(l(json!({"cpu": {"shares": 1024}})).cpu, None);
        let e = limits(&json!({"memory": {"limit": "lots"}})).unwrap_err();
        assert!(e.contains("memory.limit") && e.contains("lots"), "{e}");
        assert!(limits(&json!([1])).is_err());
    }

    #[test]
    fn the_shims_own_netns_is_rewritten_to_the_sandboxs() {
        let own = Network::Join("/proc/77/ns/net".into());
        assert_eq!(
            container_netns(&own, 77, Some(Some("/var/run/netns/cni-1"))).unwrap(),
            Some("/var/run/netns/cni-1".into())
        );
        assert_eq!(
            container_netns(&own, 77, Some(None)).unwrap(),
            None,
            "host-network pod"
        );
        let e = container_netns(&own, 77, None).unwrap_err();
        assert!(e.contains("sandbox is unknown"), "{e}");
        // Another process's namespace is passed on as is.
        assert_eq!(
            container_netns(&own, 78, None).unwrap(),
            Some("/proc/77/ns/net".into())
        );
        assert_eq!(container_netns(&Network::Host, 77, None).unwrap(), None);
        let e = container_netns(&Network::New, 77, None).unwrap_err();
        assert!(e.contains("--net-host"), "{e}");
    }

    #[test]
    fn a_bundle_is_read_from_its_config_json_and_bad_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        let e = read(d.path()).unwrap_err();
        assert!(e.contains("config.json"), "{e}");
        std::fs::write(d.path().join("config.json"), "{not json").unwrap();
        assert!(read(d.path()).unwrap_err().contains("not JSON"));
        std::fs::write(d.path().join("config.json"), sandbox_host_net().to_string()).unwrap();
        assert_eq!(sandbox_id_of(d.path()).as_deref(), Some("5f1c0ffee"));
    }
}
