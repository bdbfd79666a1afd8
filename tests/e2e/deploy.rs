//! The deployment files in deploy/ (images, Kubernetes manifests, EC2 user-data): every YAML
//! document validates offline (scripts/validate_deploy.py: Kubernetes' schemas from the
//! kubernetes-validate wheel, strict; KEDA's from deploy/schemas/), the validator refuses a
//! broken document, and every `nightshift` subcommand, `--flag` and NIGHTSHIFT_*/ORT_DYLIB_PATH
//! variable those files use exists in the binary they ship, as its `--help` says.
//!
//! Which words count as a subcommand, a flag or a variable is decided by
//! `validate_deploy.py --list-usage` (its docstring has the rules); here they are looked up in
//! the help text: subcommands under `Commands:` of `nightshift --help`, flags on the option
//! lines of `nightshift <subcommand> --help` (a line indented at most six spaces that starts
//! with `-`), variables in its `[env: NAME...]` annotations, and ORT_DYLIB_PATH in the text of
//! `--ort-lib`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};

use nightshift_tests::python::{python, root};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_nightshift");

/// Runs scripts/validate_deploy.py with the venv's python.
fn validate_deploy(args: &[&str]) -> Output {
    Command::new(python())
        .arg(root().join("scripts/validate_deploy.py"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("run scripts/validate_deploy.py")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `validated N documents, F failures`: N.
fn documents_validated(o: &Output) -> usize {
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with("validated "))
        .unwrap_or_else(|| panic!("no summary line:\n{}", text(o)));
    line["validated ".len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad summary line: {line}"))
}

/// Writes `files` into a temporary directory and validates them with `--files`.
fn validate_files(files: &[(&str, &str)]) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--files".to_string()];
    for (name, body) in files {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        args.push(path.display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (validate_deploy(&args), dir)
}

#[test]
fn every_deploy_manifest_validates_offline() {
    let o = validate_deploy(&[]);
    assert!(o.status.success(), "{}", text(&o));
    let n = documents_validated(&o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    let ok: Vec<&str> = stdout.lines().filter(|l| l.starts_with("ok ")).collect();
    assert!(n > 0, "{}", text(&o));
    assert_eq!(ok.len(), n, "one line per document:\n{stdout}");
    // The pieces deploy/README.md promises, each checked by its schema.
    for (kind, how) in [
        ("Deployment/nightshift-coordinator", "strict"),
        ("Deployment/nightshift-worker", "strict"),
        ("Service/nightshift-coordinator", "strict"),
        ("PodDisruptionBudget/nightshift-coordinator", "strict"),
        ("HorizontalPodAutoscaler/nightshift-worker", "strict"),
        ("ScaledObject/nightshift-worker", "keda-scaledobject.json"),
        ("Deployment/nightshift-scaler", "strict"),
    ] {
        assert!(
            ok.iter().any(|l| l.contains(kind) && l.contains(how)),
            "{kind} not validated ({how}):\n{stdout}"
        );
    }
}

const DEPLOYMENT_WITH_UNKNOWN_FIELD: &str = "\
apiVersion: v1
kind: Service
metadata: {name: fine, namespace: nightshift}
spec:
  selector: {app: x}
  ports: [{port: 7070}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: typo, namespace: nightshift}
spec:
  selector: {matchLabels: {app: x}}
  template:
    metadata: {labels: {app: x}}
    spec:
      containers:
        - name: coordinator
          image: nightshift-coordinator
          args: [coordinator]
          readinesProbe: {httpGet: {path: /readyz, port: 7070}}
";

#[test]
fn an_unknown_field_is_refused_naming_file_document_and_field() {
    let (o, _dir) = validate_files(&[("typo.yaml", DEPLOYMENT_WITH_UNKNOWN_FIELD)]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("ok   "), "the good document passes:\n{out}");
    let fail = out
        .lines()
        .find(|l| l.starts_with("FAIL"))
        .unwrap_or_else(|| panic!("no FAIL line:\n{out}"));
    for want in ["typo.yaml#2", "Deployment/typo", "readinesProbe"] {
        assert!(fail.contains(want), "{want} not named: {fail}");
    }
}

const SCALED_OBJECT_WITHOUT_TARGET: &str = "\
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: no-target, namespace: nightshift}
spec:
  minReplicaCount: 0
  maxReplicaCount: 4
  triggers:
    - type: prometheus
      metadata:
        serverAddress: http://prometheus:9090
        query: max(nightshift_pending_rows)
        threshold: \"1000\"
";

#[test]
fn a_scaled_object_without_scale_target_ref_is_refused() {
    let (o, _dir) = validate_files(&[("so.yaml", SCALED_OBJECT_WITHOUT_TARGET)]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("FAIL")
            && l.contains("so.yaml#1")
            && l.contains("ScaledObject/no-target")
            && l.contains("'scaleTargetRef' is a required property")),
        "{out}"
    );
    // A number where KEDA wants a string is refused too (trigger metadata is a map of strings).
    let numeric = SCALED_OBJECT_WITHOUT_TARGET
        .replace(
            "  minReplicaCount",
            "  scaleTargetRef: {name: nightshift-worker}\n  minReplicaCount",
        )
        .replace("\"1000\"", "1000");
    let (o, _dir) = validate_files(&[("numeric.yaml", &numeric)]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("threshold") && out.contains("not of type 'string'"),
        "{out}"
    );
}

#[test]
fn a_worker_grace_period_within_its_drain_timeout_is_refused() {
    let worker = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: hasty, namespace: nightshift}
spec:
  selector: {matchLabels: {app: w}}
  template:
    metadata: {labels: {app: w}}
    spec:
      terminationGracePeriodSeconds: 90
      containers:
        - name: worker
          image: nightshift-worker-gpu
          args: [worker, --coordinator, http://c:7070, --drain-timeout, 90s]
";
    let (o, _dir) = validate_files(&[("hasty.yaml", worker)]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("hasty.yaml#1") && out.contains("terminationGracePeriodSeconds (90)"),
        "{out}"
    );
    let (o, _dir) = validate_files(&[(
        "patient.yaml",
        &worker.replace("GracePeriodSeconds: 90", "GracePeriodSeconds: 120"),
    )]);
    assert!(o.status.success(), "{}", text(&o));
}

// ---- the binary's subcommands, flags and variables -------------------------------------------

/// One `nightshift` invocation found in the deploy files.
#[derive(Debug)]
struct Usage {
    source: String,
    subcommand: Option<String>,
    flags: Vec<String>,
    env: Vec<String>,
}

/// `validate_deploy.py --list-usage` over deploy/, or over `files`.
fn usages(files: &[&Path]) -> Vec<Usage> {
    let mut args = vec!["--list-usage".to_string()];
    if !files.is_empty() {
        args.push("--files".into());
        args.extend(files.iter().map(|f| f.display().to_string()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = validate_deploy(&args);
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("--list-usage prints JSON");
    let strings = |x: &Value| -> Vec<String> {
        x.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    v["usages"]
        .as_array()
        .expect("usages")
        .iter()
        .map(|u| Usage {
            source: u["source"].as_str().unwrap_or("?").to_string(),
            subcommand: u["subcommand"].as_str().map(str::to_string),
            flags: strings(&u["flags"]),
            env: strings(&u["env"]),
        })
        .collect()
}

/// `nightshift [subcommand] --help`.
fn help(subcommand: Option<&str>) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(subcommand).arg("--help");
    let o = cmd.output().expect("run nightshift --help");
    assert!(o.status.success(), "{:?}: {}", subcommand, text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The subcommands listed under `Commands:`.
fn subcommands(top: &str) -> BTreeSet<String> {
    top.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// The long flags on option lines (`  -h, --help`, `      --token-file <TOKEN_FILE>`): not
/// the ones a description merely mentions.
fn flags(help: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        if line.len() - trimmed.len() > 6 || !trimmed.starts_with('-') {
            continue;
        }
        let long = trimmed
            .split(|c: char| c.is_whitespace() || c == ',')
            .find(|w| w.starts_with("--"));
        if let Some(w) = long {
            let name: String = w[2..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !name.is_empty() {
                out.insert(format!("--{name}"));
            }
        }
    }
    out
}

/// The names in `[env: NAME]` / `[env: NAME=value]`.
fn env_vars(help: &str) -> BTreeSet<String> {
    help.split("[env: ")
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect::<String>()
        })
        .filter(|n| !n.is_empty())
        .collect()
}

/// Whether a subcommand's help takes `name` from the environment.
fn reads_env(help: &str, name: &str) -> bool {
    if name == "ORT_DYLIB_PATH" {
        // Not a clap `env`: --ort-lib falls back to it, and its help says so.
        return help
            .lines()
            .any(|l| l.contains("--ort-lib") && l.contains(name))
            || (flags(help).contains("--ort-lib") && help.contains(name));
    }
    env_vars(help).contains(name)
}

/// What the binary lacks of what `usages` use, one line each, sorted.
fn missing(usages: &[Usage]) -> Vec<String> {
    let top = help(None);
    let subs = subcommands(&top);
    let mut helps: BTreeMap<String, String> = BTreeMap::new();
    for s in &subs {
        if s != "help"
            && usages
                .iter()
                .any(|u| u.subcommand.is_none() || u.subcommand.as_deref() == Some(s.as_str()))
        {
            helps.insert(s.clone(), help(Some(s.as_str())));
        }
    }
    let mut out = BTreeSet::new();
    for u in usages {
        let src = &u.source;
        match u.subcommand.as_deref() {
            Some(s) if !subs.contains(s) => {
                out.insert(format!("subcommand `nightshift {s}` ({src})"));
                for f in &u.flags {
                    out.insert(format!("flag `nightshift {s} {f}` ({src})"));
                }
                for e in &u.env {
                    out.insert(format!("variable {e} of `nightshift {s}` ({src})"));
                }
            }
            Some(s) => {
                let h = &helps[s];
                let known = flags(h);
                for f in u.flags.iter().filter(|f| !known.contains(*f)) {
                    out.insert(format!("flag `nightshift {s} {f}` ({src})"));
                }
                for e in u.env.iter().filter(|e| !reads_env(h, e)) {
                    out.insert(format!("variable {e} of `nightshift {s}` ({src})"));
                }
            }
            None => {
                let known = flags(&top);
                for f in u.flags.iter().filter(|f| !known.contains(*f)) {
                    out.insert(format!("flag `nightshift {f}` ({src})"));
                }
                for e in u
                    .env
                    .iter()
                    .filter(|e| !helps.values().any(|h| reads_env(h, e)))
                {
                    out.insert(format!("variable {e}, read by no subcommand ({src})"));
                }
            }
        }
    }
    out.into_iter().collect()
}

#[test]
fn every_subcommand_flag_and_variable_the_deploy_files_use_exists() {
    let used = usages(&[]);
    for (sub, from) in [
        ("coordinator", "deploy/k8s/coordinator/coordinator.yaml"),
        ("worker", "deploy/k8s/worker/worker.yaml"),
        ("worker", "deploy/images/worker-gpu.Dockerfile"),
        ("worker", "deploy/ec2/user-data.sh"),
        ("scaler", "deploy/k8s/scaler/scaler.yaml"),
    ] {
        assert!(
            used.iter()
                .any(|u| u.subcommand.as_deref() == Some(sub) && u.source.starts_with(from)),
            "no `nightshift {sub}` found in {from}: {used:#?}"
        );
    }
    let flags_seen: usize = used.iter().map(|u| u.flags.len()).sum();
    assert!(flags_seen > 20, "{used:#?}");
    let missing = missing(&used);
    assert!(
        missing.is_empty(),
        "the deploy files use {} thing(s) `nightshift` does not have:\n  {}",
        missing.len(),
        missing.join("\n  ")
    );
}

#[test]
fn a_flag_variable_or_subcommand_the_binary_lacks_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("worker.yaml");
    std::fs::write(
        &manifest,
        "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: w, namespace: nightshift}
spec:
  selector: {matchLabels: {app: w}}
  template:
    metadata: {labels: {app: w}}
    spec:
      terminationGracePeriodSeconds: 120
      containers:
        - name: worker
          image: nightshift-worker-gpu
          args: [worker, --coordinator, http://c:7070, --no-such-flag, --log-json]
          env:
            - {name: NIGHTSHIFT_TOKEN_FILE, value: /run/token}
            - {name: NIGHTSHIFT_NO_SUCH_VAR, value: x}
",
    )
    .unwrap();
    let script = dir.path().join("boot.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n# nightshift worker --in-a-comment\nexec nightshift no-such-command \\\n  --whatever\n",
    )
    .unwrap();
    let used = usages(&[&manifest, &script]);
    let missing = missing(&used);
    let all = missing.join("\n");
    for want in [
        "flag `nightshift worker --no-such-flag`",
        "variable NIGHTSHIFT_NO_SUCH_VAR of `nightshift worker`",
        "subcommand `nightshift no-such-command`",
        "flag `nightshift no-such-command --whatever`",
    ] {
        assert!(all.contains(want), "{want} not reported:\n{all}");
    }
    for fine in [
        "--coordinator",
        "--log-json",
        "NIGHTSHIFT_TOKEN_FILE",
        "--in-a-comment",
    ] {
        assert!(!all.contains(fine), "{fine} reported:\n{all}");
    }
    assert_eq!(missing.len(), 4, "{all}");
}
