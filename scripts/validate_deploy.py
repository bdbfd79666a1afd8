#!/usr/bin/env python3
"""Validates nightshift's deployment files (deploy/) offline, and lists the nightshift command
lines they use.

    validate_deploy.py                    every YAML document under deploy/k8s/, deploy/prometheus/
    validate_deploy.py --files A.yaml ... the given files instead
    validate_deploy.py --list-usage [--files ...]
                                          prints, as JSON, each `nightshift` invocation found in
                                          deploy/ (or in the given files): subcommand, flags and
                                          environment variables, for tests/e2e/deploy.rs to check
                                          against the binary's --help

Validation, for each YAML document of deploy/k8s/** (one `ok` line each, a `FAIL` line naming
the file, the document and the error otherwise; exit status 1 on any failure):
  - Kubernetes kinds: kubernetes-validate's schemas for Kubernetes KUBERNETES_VERSION, strict
    (an unknown field is an error, a kind without a schema too). Offline: the schemas are in
    the kubernetes-validate wheel.
  - KEDA kinds (keda.sh): the JSON Schemas in deploy/schemas/ (hand-written from KEDA v2's
    CRDs; see their $comment), with jsonschema; their metadata is checked as Kubernetes
    ObjectMeta, and minReplicaCount <= maxReplicaCount (the CRD's CEL rule).
  - Kustomization (kustomize.config.k8s.io): known top-level keys only, and each resource it
    lists exists (a file, or a directory holding a kustomization.yaml).
  - Across documents: a pod that runs `nightshift worker` has terminationGracePeriodSeconds
    above the worker's --drain-timeout (the worker drains on SIGTERM: it finishes its batches,
    checkpoints and releases its shards before the SIGKILL), and, for the whole of deploy/, a
    ScaledObject's or HorizontalPodAutoscaler's scaleTargetRef names a Deployment defined there.
deploy/prometheus/*.yaml (Prometheus and Helm configuration, not Kubernetes objects) are only
parsed.

Usage rules (--list-usage), simple on purpose:
  - YAML: every pod spec (any mapping with a `containers` list) in deploy/k8s/**; for each
    container and init container, argv = command + args, or, without `command`, `nightshift`
    followed by args when the image's name contains "nightshift" (its ENTRYPOINT). In argv, a
    `nightshift` word (or a path ending in /nightshift) followed by a lowercase word is an
    invocation of that subcommand, followed by a `--flag` it is a top-level invocation, unless
    the word before it is an option (`--fleet-name nightshift`, `-u nightshift`: a value; `--`
    excepted); the `--flag` items after it are its flags (`--flag=value` counts as `--flag`),
    up to the first shell operator word (`&&`, `|`, `;`, `>`...). An argv item holding spaces
    (`sh -c "..."`) is read with the shell rule. The container's env names NIGHTSHIFT_* and
    ORT_DYLIB_PATH are the invocation's environment variables.
  - Shell (deploy/**/*.sh) and Dockerfile RUN lines: comment lines dropped, backslash
    continuations joined, each line split into shell words, read with the invocation rule.
  - Dockerfiles (deploy/images/*.Dockerfile): the final stage's ENTRYPOINT + CMD (JSON form)
    read as an argv like a container's; ENV names, and any NIGHTSHIFT_*/ORT_DYLIB_PATH word
    outside comments, are that invocation's environment variables.
  - Shell files: any NIGHTSHIFT_*/ORT_DYLIB_PATH word outside comments is an environment
    variable of no particular subcommand (checked against all of them).
"""

import argparse
import json
import pathlib
import re
import shlex
import sys

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv_utils

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SCHEMA_DIR = DEPLOY / "schemas"
KUBERNETES_VERSION = "1.30"

# (apiVersion, kind) -> the JSON Schema file in deploy/schemas/.
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.json",
}
KUSTOMIZATION = ("kustomize.config.k8s.io/v1beta1", "Kustomization")
KUSTOMIZATION_KEYS = {
    "apiVersion", "kind", "metadata", "resources", "components", "namespace", "namePrefix",
    "nameSuffix", "labels", "commonLabels", "commonAnnotations", "images", "replicas",
    "patches", "configMapGenerator", "secretGenerator", "generatorOptions", "replacements",
    "buildMetadata", "openapi", "crds", "helmCharts", "transformers", "generators",
    "validators", "sortOptions",
}
# Defaults of the flags the cross-document checks read (cli/src/cmd_cluster.rs).
DEFAULT_DRAIN_SECONDS = 90.0
DEFAULT_GRACE_SECONDS = 30

ENV_RE = re.compile(r"\b(NIGHTSHIFT_[A-Z0-9_]+|ORT_DYLIB_PATH)\b")
FLAG_RE = re.compile(r"^(--[a-z0-9][a-z0-9-]*)(=.*)?$")
SUBCOMMAND_RE = re.compile(r"^[a-z][a-z0-9-]*$")


class Failure(Exception):
    pass


def rel(path):
    path = pathlib.Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def yaml_documents(path):
    """(1-based index, document) for each non-empty YAML document of a file."""
    with open(path) as f:
        docs = list(yaml.safe_load_all(f))
    return [(i, d) for i, d in enumerate((d for d in docs if d is not None), start=1)]


def describe(doc):
    if not isinstance(doc, dict):
        return "?"
    name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
    return f"{doc.get('kind', '?')}/{name or '-'}"


def error_path(err):
    path = ".".join(str(p) for p in err.absolute_path)
    return path or "(document)"


def check_kubernetes(doc):
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kv_utils.ValidationError as e:
        raise Failure(f"{error_path(e)}: {e.message}") from None
    except kv_utils.SchemaNotFoundError as e:
        raise Failure(e.message) from None
    return f"kubernetes {KUBERNETES_VERSION}, strict"


def check_crd(doc, schema_file):
    schema = json.loads((SCHEMA_DIR / schema_file).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        raise Failure("; ".join(f"{error_path(e)}: {e.message}" for e in errors))
    # Kubernetes' own ObjectMeta rules for the metadata (strict, as for any object).
    probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
    try:
        kubernetes_validate.validate(probe, KUBERNETES_VERSION, strict=True)
    except kv_utils.ValidationError as e:
        raise Failure(f"{error_path(e)}: {e.message}") from None
    spec = doc.get("spec", {})
    if doc.get("kind") == "ScaledObject" and "minReplicaCount" in spec:
        if spec["minReplicaCount"] > spec.get("maxReplicaCount", 100):
            raise Failure("spec: minReplicaCount must be less than or equal to maxReplicaCount")
    return f"deploy/schemas/{schema_file}"


def check_kustomization(doc, path):
    unknown = sorted(set(doc) - KUSTOMIZATION_KEYS)
    if unknown:
        raise Failure(f"unknown Kustomization field(s): {', '.join(unknown)}")
    resources = doc.get("resources") or []
    if not isinstance(resources, list) or not all(isinstance(r, str) for r in resources):
        raise Failure("resources: a list of paths")
    base = pathlib.Path(path).resolve().parent
    for r in resources:
        target = base / r
        if target.is_dir():
            if not any((target / n).is_file() for n in
                       ("kustomization.yaml", "kustomization.yml", "Kustomization")):
                raise Failure(f"resources: {r} is a directory without a kustomization.yaml")
        elif not target.is_file():
            raise Failure(f"resources: {r} does not exist")
    return f"kustomization, {len(resources)} resources present"


def check_document(doc, path):
    if not isinstance(doc, dict):
        raise Failure("not a mapping")
    api, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api, str) or not isinstance(kind, str):
        raise Failure("apiVersion and kind are required")
    if (api, kind) == KUSTOMIZATION:
        return check_kustomization(doc, path)
    if (api, kind) in CRD_SCHEMAS:
        return check_crd(doc, CRD_SCHEMAS[(api, kind)])
    if api.split("/")[0].endswith("keda.sh"):
        raise Failure(f"no schema in deploy/schemas/ for {kind} ({api})")
    return check_kubernetes(doc)


# ---- nightshift invocations ----------------------------------------------------------------


def is_nightshift(word):
    return word == "nightshift" or word.endswith("/nightshift")


def is_operator(word):
    return bool(word) and all(c in "();<>|&" for c in word)


def invocations_in_argv(argv):
    """[(subcommand or None, [flags])] for each `nightshift` invocation in a list of words."""
    found = []
    for i, word in enumerate(argv):
        if not is_nightshift(word) or i + 1 >= len(argv):
            continue
        if i > 0 and argv[i - 1].startswith("-") and argv[i - 1] != "--":
            continue  # an option's value: `--fleet-name nightshift`, `runuser -u nightshift`
        nxt = argv[i + 1]
        if FLAG_RE.match(nxt):
            sub, rest = None, argv[i + 1:]
        elif SUBCOMMAND_RE.match(nxt):
            sub, rest = nxt, argv[i + 2:]
        else:
            continue
        flags = []
        for w in rest:
            if is_operator(w):
                break
            m = FLAG_RE.match(w)
            if m and m.group(1) not in flags:
                flags.append(m.group(1))
        found.append((sub, flags))
    return found


def shell_lines(text):
    """Logical lines: comment lines dropped, backslash continuations joined."""
    lines, current = [], ""
    for raw in text.splitlines():
        if raw.strip().startswith("#") and not current:
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        lines.append(current + raw)
        current = ""
    if current:
        lines.append(current)
    return lines


def shell_words(line):
    try:
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        return list(lex)
    except ValueError:
        return line.split()


def shell_invocations(text):
    found = []
    for line in shell_lines(text):
        found.extend(invocations_in_argv(shell_words(line)))
    return found


def env_words(text):
    names = []
    for line in shell_lines(text):
        for name in ENV_RE.findall(line.split(" #")[0]):
            if name not in names:
                names.append(name)
    return names


def usage(source, sub, flags, env):
    return {"source": source, "subcommand": sub, "flags": flags, "env": env}


def argv_usages(source, argv, env):
    out = []
    found = invocations_in_argv(argv)
    for item in argv:
        if " " in item:
            found.extend(shell_invocations(item))
    for sub, flags in found:
        out.append(usage(source, sub, flags, env))
    if not found and env:
        out.append(usage(source, None, [], env))
    return out


def pod_specs(node):
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield node
        for v in node.values():
            yield from pod_specs(v)
    elif isinstance(node, list):
        for v in node:
            yield from pod_specs(v)


def container_argv(c):
    command = [str(x) for x in c.get("command") or []]
    args = [str(x) for x in c.get("args") or []]
    if command:
        return command + args
    if "nightshift" in str(c.get("image", "")):
        return ["nightshift"] + args
    return args


def yaml_usages(path):
    out = []
    for i, doc in yaml_documents(path):
        for spec in pod_specs(doc):
            for c in (spec.get("initContainers") or []) + spec["containers"]:
                if not isinstance(c, dict):
                    continue
                env = [e["name"] for e in c.get("env") or []
                       if isinstance(e, dict) and ENV_RE.fullmatch(str(e.get("name", "")))]
                source = f"{rel(path)}#{i} {describe(doc)} container {c.get('name')}"
                out.extend(argv_usages(source, container_argv(c), env))
    return out


def dockerfile_usages(path):
    text = pathlib.Path(path).read_text()
    lines = shell_lines(text)
    final = max((i for i, l in enumerate(lines) if l.strip().upper().startswith("FROM ")), default=0)
    entrypoint, cmd, env, out = [], [], [], []
    for line in lines[final:]:
        parts = line.strip().split(None, 1)
        if len(parts) < 2:
            continue
        instr, rest = parts[0].upper(), parts[1]
        if instr in ("ENTRYPOINT", "CMD"):
            try:
                value = json.loads(rest)
            except json.JSONDecodeError:
                value = shell_words(rest)
            if instr == "ENTRYPOINT":
                entrypoint = [str(x) for x in value]
            else:
                cmd = [str(x) for x in value]
    for name in env_words(text):
        env.append(name)
    for line in lines:
        parts = line.strip().split(None, 1)
        if len(parts) == 2 and parts[0].upper() == "RUN":
            for sub, flags in shell_invocations(parts[1]):
                out.append(usage(f"{rel(path)} RUN", sub, flags, []))
    out.extend(argv_usages(f"{rel(path)} ENTRYPOINT+CMD", entrypoint + cmd, env))
    return out


def shell_usages(path):
    text = pathlib.Path(path).read_text()
    out = [usage(rel(path), sub, flags, []) for sub, flags in shell_invocations(text)]
    env = env_words(text)
    if env:
        out.append(usage(rel(path), None, [], env))
    return out


def usages_of(path):
    name = pathlib.Path(path).name
    if name.endswith((".yaml", ".yml")):
        return yaml_usages(path)
    if name.endswith("Dockerfile"):
        return dockerfile_usages(path)
    if name.endswith(".sh"):
        return shell_usages(path)
    return []


# ---- cross-document checks -------------------------------------------------------------------


def parse_duration(s):
    m = re.fullmatch(r"([0-9.]+)(ms|s|m|h)?", str(s).strip())
    if not m:
        raise Failure(f"--drain-timeout {s!r} is not a duration")
    n = float(m.group(1))
    return n * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)]


def check_grace(doc):
    """A pod that runs `nightshift worker` outlives the worker's drain after SIGTERM."""
    for spec in pod_specs(doc):
        grace = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
        for c in spec["containers"]:
            argv = container_argv(c)
            if not any(sub == "worker" for sub, _ in invocations_in_argv(argv)):
                continue
            drain = DEFAULT_DRAIN_SECONDS
            for j, w in enumerate(argv):
                if w == "--drain-timeout" and j + 1 < len(argv):
                    drain = parse_duration(argv[j + 1])
                elif w.startswith("--drain-timeout="):
                    drain = parse_duration(w.split("=", 1)[1])
            if not grace > drain:
                raise Failure(
                    f"container {c.get('name')}: terminationGracePeriodSeconds ({grace}) must "
                    f"exceed the worker's --drain-timeout ({drain:g}s), or Kubernetes kills "
                    "workers before they have checkpointed and released their shards")


def check_targets(validated):
    """ScaledObjects and HPAs scale a Deployment defined in deploy/k8s."""
    deployments = {((d.get("metadata") or {}).get("namespace"), d["metadata"]["name"])
                   for _, _, d in validated if d.get("kind") == "Deployment"}
    failures = []
    for path, i, d in validated:
        if d.get("kind") not in ("ScaledObject", "HorizontalPodAutoscaler"):
            continue
        ref = d.get("spec", {}).get("scaleTargetRef", {})
        key = ((d.get("metadata") or {}).get("namespace"), ref.get("name"))
        if ref.get("kind", "Deployment") == "Deployment" and key not in deployments:
            failures.append((path, i, d, f"scaleTargetRef: no Deployment {ref.get('name')} "
                                         f"in namespace {key[0]} under deploy/k8s"))
    return failures


# ---- main ------------------------------------------------------------------------------------


def default_files():
    k8s = sorted(p for p in (DEPLOY / "k8s").rglob("*") if p.suffix in (".yaml", ".yml"))
    other = sorted(p for p in (DEPLOY / "prometheus").rglob("*") if p.suffix in (".yaml", ".yml"))
    return k8s, other


def usage_files():
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and p.parent != SCHEMA_DIR
             and (p.suffix in (".yaml", ".yml", ".sh") or p.name.endswith("Dockerfile"))]
    return sorted(files)


def fail_line(path, i, doc, msg):
    return f"FAIL {rel(path)}#{i} {describe(doc)}: {msg}"


def validate(k8s_files, other_files, whole_tree):
    failures, validated, count = [], [], 0
    for path in k8s_files:
        try:
            docs = yaml_documents(path)
        except (OSError, yaml.YAMLError) as e:
            failures.append(f"FAIL {rel(path)}: cannot read YAML: {e}")
            continue
        if not docs:
            failures.append(f"FAIL {rel(path)}: no YAML document")
        for i, doc in docs:
            try:
                how = check_document(doc, path)
                check_grace(doc)
            except Failure as e:
                failures.append(fail_line(path, i, doc, e))
                continue
            except Exception as e:  # a schema that cannot be read, a bad duration type...
                failures.append(fail_line(path, i, doc, f"{type(e).__name__}: {e}"))
                continue
            validated.append((path, i, doc))
            count += 1
            print(f"ok   {rel(path)}#{i} {describe(doc)} ({how})")
    for path in other_files:
        try:
            docs = yaml_documents(path)
        except (OSError, yaml.YAMLError) as e:
            failures.append(f"FAIL {rel(path)}: cannot read YAML: {e}")
            continue
        for i, _ in docs:
            count += 1
            print(f"ok   {rel(path)}#{i} (YAML syntax only: not a Kubernetes object)")
    if whole_tree:
        failures.extend(fail_line(p, i, d, m) for p, i, d, m in check_targets(validated))
    for line in failures:
        print(line)
        print(line, file=sys.stderr)
    print(f"validated {count} documents, {len(failures)} failures")
    return 1 if failures else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", nargs="+", metavar="FILE",
                    help="validate (or list the usage of) these files instead of deploy/")
    ap.add_argument("--list-usage", action="store_true",
                    help="print the nightshift invocations as JSON instead of validating")
    args = ap.parse_args()
    if args.list_usage:
        files = args.files or usage_files()
        print(json.dumps({"usages": [u for f in files for u in usages_of(f)]}, indent=1))
        return 0
    if args.files:
        return validate(args.files, [], whole_tree=False)
    k8s, other = default_files()
    return validate(k8s, other, whole_tree=True)


if __name__ == "__main__":
    sys.exit(main())
