//! The deployment manifests in `deploy/`, checked without a Kubernetes cluster: every object
//! parses and has the fields the operations runbook relies on, the objects agree with each other
//! (names, selectors, ports), every `BUSBAR_*` variable is a real `busbar` flag, and the join and
//! leave settings are the ones the compose test exercises for real (`deploy/compose/test.sh`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use serde_yaml::Value;

type Res<T> = anyhow::Result<T>;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every YAML document of a file (a file may hold several, separated by `---`).
fn documents(path: &Path) -> Res<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut docs = Vec::new();
    // Documents are separated by a line of `---` (our manifests use no other document markers).
    for (i, part) in text.split("\n---").enumerate() {
        let mut v: Value =
            serde_yaml::from_str(part).with_context(|| format!("parsing {} document {i}", path.display()))?;
        // Compose files share settings through `<<: *anchor`, which compose resolves.
        v.apply_merge().with_context(|| format!("merging keys in {}", path.display()))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn yaml_files(dir: &Path) -> Res<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = e?.file_name().to_string_lossy().to_string();
        if name.ends_with(".yaml") || name.ends_with(".yml") {
            out.insert(name);
        }
    }
    Ok(out)
}

/// The string at `path` (keys, or indexes as decimal strings), or an error naming the path.
fn s<'a>(v: &'a Value, path: &[&str]) -> Res<&'a str> {
    at(v, path)?.as_str().with_context(|| format!("{} is not a string", path.join(".")))
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Res<&'a Value> {
    let mut cur = v;
    for (i, key) in path.iter().enumerate() {
        let next = match key.parse::<usize>() {
            Ok(n) => cur.get(n),
            Err(_) => cur.get(*key),
        };
        cur = next.with_context(|| format!("missing {}", path[..=i].join(".")))?;
    }
    Ok(cur)
}

fn map_of_strings(v: &Value) -> Res<BTreeMap<String, String>> {
    let m = v.as_mapping().context("not a mapping")?;
    m.iter()
        .map(|(k, v)| {
            let k = k.as_str().context("non-string key")?.to_string();
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => bail!("{k}: not a scalar: {other:?}"),
            };
            Ok((k, v))
        })
        .collect()
}

/// The `env = "BUSBAR_..."` names the `busbar` CLI declares: a manifest may only set these.
fn cli_env_names() -> Res<BTreeSet<String>> {
    let src = std::fs::read_to_string(repo().join("crates/busbar/src/cli.rs")).context("reading cli.rs")?;
    let names: BTreeSet<String> =
        src.split("env = \"").skip(1).filter_map(|rest| rest.split('"').next()).map(str::to_string).collect();
    ensure!(names.contains("BUSBAR_PEERS") && names.contains("BUSBAR_HTTP"), "cli.rs env names not found: {names:?}");
    Ok(names)
}

fn check_env_names(env: &BTreeMap<String, String>, known: &BTreeSet<String>, what: &str) -> Res<()> {
    for k in env.keys().filter(|k| k.starts_with("BUSBAR_")) {
        ensure!(known.contains(k), "{what}: {k} is not a busbar flag's variable (cli.rs declares {known:?})");
    }
    Ok(())
}

/// Parses `1=HOST:PORT,2=HOST:PORT` as the server does.
fn peers(s: &str) -> Res<BTreeMap<u64, String>> {
    s.split(',')
        .map(|p| {
            let (id, addr) = p.trim().split_once('=').with_context(|| format!("peer {p:?}"))?;
            Ok((id.parse()?, addr.to_string()))
        })
        .collect()
}

fn port_of(addr: &str) -> Res<u16> {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).with_context(|| format!("no port in {addr:?}"))
}

#[test]
fn kubernetes_objects_have_what_they_need_and_agree() -> Res<()> {
    let dir = repo().join("deploy/kubernetes");
    let files = yaml_files(&dir)?;
    ensure!(files.contains("kustomization.yaml"), "no kustomization.yaml in {}", dir.display());

    // kustomization lists every manifest, and only files that exist.
    let kust = documents(&dir.join("kustomization.yaml"))?.pop().context("empty kustomization.yaml")?;
    ensure!(s(&kust, &["kind"])? == "Kustomization");
    let listed: BTreeSet<String> = at(&kust, &["resources"])?
        .as_sequence()
        .context("resources is not a list")?
        .iter()
        .map(|r| r.as_str().map(str::to_string).context("a resource is not a string"))
        .collect::<Res<_>>()?;
    let manifests: BTreeSet<String> = files.iter().filter(|f| *f != "kustomization.yaml").cloned().collect();
    ensure!(listed == manifests, "kustomization lists {listed:?}, the directory holds {manifests:?}");

    let mut by_kind: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for f in &manifests {
        for doc in documents(&dir.join(f))? {
            for field in ["apiVersion", "kind"] {
                s(&doc, &[field]).with_context(|| f.clone())?;
            }
            s(&doc, &["metadata", "name"]).with_context(|| f.clone())?;
            by_kind.entry(s(&doc, &["kind"])?.to_string()).or_default().push(doc);
        }
    }
    let one = |kind: &str| -> Res<&Value> {
        match by_kind.get(kind).map(Vec::as_slice) {
            Some([v]) => Ok(v),
            other => bail!("expected one {kind}, found {}", other.map_or(0, <[Value]>::len)),
        }
    };

    let sts = one("StatefulSet")?;
    ensure!(s(sts, &["apiVersion"])? == "apps/v1");
    let service_name = s(sts, &["spec", "serviceName"])?;
    let sts_name = s(sts, &["metadata", "name"])?;
    let selector = map_of_strings(at(sts, &["spec", "selector", "matchLabels"])?)?;
    let pod_labels = map_of_strings(at(sts, &["spec", "template", "metadata", "labels"])?)?;
    ensure!(
        selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
        "selector {selector:?} vs pod labels {pod_labels:?}"
    );
    ensure!(s(sts, &["spec", "podManagementPolicy"])? == "Parallel", "initial voters must start together");
    let replicas = at(sts, &["spec", "replicas"])?.as_u64().context("replicas")?;

    // Services: the governing one is headless and publishes not-ready pods; every selector finds the pods.
    let services = by_kind.get("Service").context("no Service")?;
    let headless = services
        .iter()
        .find(|svc| s(svc, &["metadata", "name"]).ok() == Some(service_name))
        .with_context(|| format!("no Service named {service_name} (the StatefulSet's serviceName)"))?;
    ensure!(s(headless, &["spec", "clusterIP"])? == "None", "the governing Service must be headless");
    ensure!(at(headless, &["spec", "publishNotReadyAddresses"])?.as_bool() == Some(true));
    for svc in services {
        let sel = map_of_strings(at(svc, &["spec", "selector"])?)?;
        ensure!(sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "Service selector {sel:?} finds no pod");
    }

    // The container: ports, env, probes, data volume.
    let containers = at(sts, &["spec", "template", "spec", "containers"])?.as_sequence().context("containers")?;
    let c = containers.iter().find(|c| s(c, &["name"]).ok() == Some("busbar")).context("no busbar container")?;
    let mut ports = BTreeMap::new();
    for p in at(c, &["ports"])?.as_sequence().context("ports")? {
        ports.insert(s(p, &["name"])?.to_string(), at(p, &["containerPort"])?.as_u64().context("containerPort")?);
    }
    for svc in services {
        for p in at(svc, &["spec", "ports"])?.as_sequence().context("service ports")? {
            let target = s(p, &["targetPort"])?;
            ensure!(ports.contains_key(target), "Service port targets {target:?}, not a container port name");
        }
    }
    let env_list = at(c, &["env"])?.as_sequence().context("env")?;
    let mut env = BTreeMap::new();
    let mut order = Vec::new();
    for e in env_list {
        let name = s(e, &["name"])?.to_string();
        if let Ok(v) = s(e, &["value"]) {
            env.insert(name.clone(), v.to_string());
        } else {
            ensure!(at(e, &["valueFrom"]).is_ok(), "env {name} has neither value nor valueFrom");
        }
        order.push(name);
    }
    check_env_names(&env, &cli_env_names()?, "statefulset.yaml")?;
    let pos = |n: &str| order.iter().position(|o| o == n);
    ensure!(pos("POD_NAME") < pos("BUSBAR_ADVERTISE"), "POD_NAME must be defined before BUSBAR_ADVERTISE uses it");
    let pod_name = env_list.iter().find(|e| s(e, &["name"]).ok() == Some("POD_NAME")).context("no POD_NAME")?;
    ensure!(s(pod_name, &["valueFrom", "fieldRef", "fieldPath"])? == "metadata.name");
    let grpc = ports.get("grpc").copied().context("no grpc port")?;
    let http = ports.get("http").copied().context("no http port")?;
    ensure!(env.get("BUSBAR_ID_FROM_HOSTNAME").map(String::as_str) == Some("true"));
    ensure!(
        env.get("BUSBAR_AUTO_MEMBERSHIP").map(String::as_str) == Some("true"),
        "pods must join and leave by themselves"
    );
    ensure!(env.get("BUSBAR_ADVERTISE") == Some(&format!("$(POD_NAME).{service_name}:{grpc}")));
    ensure!(u64::from(port_of(env.get("BUSBAR_LISTEN").context("no BUSBAR_LISTEN")?)?) == grpc);
    ensure!(u64::from(port_of(env.get("BUSBAR_HTTP").context("no BUSBAR_HTTP")?)?) == http);
    // The initial voters are the first `replicas` pods, each at the address it advertises
    // (the server refuses a --peers entry for itself that differs from --advertise).
    let initial = peers(env.get("BUSBAR_PEERS").context("no BUSBAR_PEERS")?)?;
    let want: BTreeMap<u64, String> =
        (0..replicas).map(|i| (i + 1, format!("{sts_name}-{i}.{service_name}:{grpc}"))).collect();
    ensure!(initial == want, "BUSBAR_PEERS {initial:?}; want {want:?}");
    for id in initial.keys() {
        let host = format!("{sts_name}-{}", id - 1);
        ensure!(busbar_server::config::id_from_hostname(&host).ok() == Some(*id), "{host} is not node {id}");
    }

    let ready = at(c, &["readinessProbe", "httpGet"])?;
    ensure!(s(ready, &["path"])? == "/readyz");
    ensure!(s(ready, &["port"])? == "http");
    let live = at(c, &["livenessProbe", "httpGet"])?;
    ensure!(s(live, &["path"])? == "/healthz", "liveness must not depend on the cluster (/healthz)");

    // Leaving at a graceful stop must fit in the grace period.
    let grace = at(sts, &["spec", "template", "spec", "terminationGracePeriodSeconds"])?.as_u64().context("grace")?;
    ensure!(
        grace > busbar_server::lifecycle::LEAVE_TIMEOUT.as_secs() + 10,
        "terminationGracePeriodSeconds {grace} leaves no room for leaving (bounded at {:?})",
        busbar_server::lifecycle::LEAVE_TIMEOUT
    );

    let data_dir = env.get("BUSBAR_DATA_DIR").context("no BUSBAR_DATA_DIR")?;
    let mounts = at(c, &["volumeMounts"])?.as_sequence().context("volumeMounts")?;
    let data_mount = mounts.iter().find(|m| s(m, &["mountPath"]).ok() == Some(data_dir.as_str()));
    let data_volume = s(data_mount.context("nothing mounted at BUSBAR_DATA_DIR")?, &["name"])?;
    let claims = at(sts, &["spec", "volumeClaimTemplates"])?.as_sequence().context("volumeClaimTemplates")?;
    let claim = claims
        .iter()
        .find(|t| s(t, &["metadata", "name"]).ok() == Some(data_volume))
        .context("the data dir is not on a volumeClaimTemplate")?;
    s(claim, &["spec", "resources", "requests", "storage"])?;

    // The disruption budget covers the pods and keeps a quorum: one voluntary disruption at a time.
    let pdb = one("PodDisruptionBudget")?;
    ensure!(s(pdb, &["apiVersion"])? == "policy/v1");
    ensure!(map_of_strings(at(pdb, &["spec", "selector", "matchLabels"])?)? == selector, "PDB selector differs");
    ensure!(at(pdb, &["spec", "maxUnavailable"])?.as_u64() == Some(1));
    Ok(())
}

#[test]
fn compose_files_agree_with_the_server_flags() -> Res<()> {
    let dir = repo().join("deploy/compose");
    let known = cli_env_names()?;
    let mut services = BTreeMap::new();
    for f in ["docker-compose.yml", "scale-5.yml"] {
        let doc = documents(&dir.join(f))?.pop().with_context(|| format!("empty {f}"))?;
        for (name, svc) in at(&doc, &["services"])?.as_mapping().context("services")? {
            let name = name.as_str().context("service name")?.to_string();
            let env = map_of_strings(at(svc, &["environment"]).with_context(|| format!("{f}: {name}"))?)?;
            check_env_names(&env, &known, &format!("{f}: {name}"))?;
            let volumes = at(svc, &["volumes"])?.as_sequence().context("volumes")?;
            let data = env.get("BUSBAR_DATA_DIR").context("no BUSBAR_DATA_DIR")?;
            ensure!(
                volumes.iter().any(|v| v.as_str().is_some_and(|v| v.ends_with(&format!(":{data}")))),
                "{name}: no volume at {data}"
            );
            services.insert(name, env);
        }
    }
    let ids: BTreeSet<String> = services.keys().cloned().collect();
    ensure!(ids == (1..=5).map(|i| format!("busbar-{i}")).collect(), "services {ids:?}");
    let initial = peers(services["busbar-1"].get("BUSBAR_PEERS").context("no peers")?)?;
    for (name, env) in &services {
        let id: u64 = env.get("BUSBAR_ID").context("no BUSBAR_ID")?.parse()?;
        ensure!(*name == format!("busbar-{id}"), "{name} has id {id}");
        ensure!(env.get("BUSBAR_ADVERTISE") == Some(&format!("{name}:9501")), "{name}: advertise");
        ensure!(env.get("BUSBAR_AUTO_MEMBERSHIP").map(String::as_str) == Some("true"), "{name}: auto membership");
        ensure!(env.get("BUSBAR_HTTP").is_some(), "{name}: no HTTP admin port");
        ensure!(peers(env.get("BUSBAR_PEERS").context("no peers")?)? == initial, "{name}: other --peers");
        // Nodes 1-3 are the initial voters at their advertised addresses; 4 and 5 join.
        match initial.get(&id) {
            Some(addr) => ensure!(Some(addr) == env.get("BUSBAR_ADVERTISE"), "{name}: peers address"),
            None => ensure!(id > 3, "{name} should be an initial voter"),
        }
    }
    ensure!(initial.keys().copied().collect::<Vec<_>>() == vec![1, 2, 3]);
    Ok(())
}
