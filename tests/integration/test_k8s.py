"""The Kubernetes manifests and container images (deploy/, docker/).

- every overlay renders with `kubectl kustomize`, and every rendered object is valid against
  the Kubernetes API schema with no field the schema does not know (tests/k8s/validate.js);
  the validator itself rejects a wrong type, an unknown field and a bad Dockerfile;
- the Dockerfiles pass the image rules (tests/k8s/validate.js --dockerfile);
- the manifests cannot drift from the binaries: every flag, config-file option and AFD_*
  variable given to a daemon is one its --help lists, the daemon accepts the whole
  configuration (--print-config), every probe and container port is a port the daemon is
  configured to listen on, Services and addresses point at the right ports, hooks call
  commands the image has, grace periods exceed the drain timeout, the coordinator expects as
  many nodes as the StatefulSets run;
- the cpu-demo overlay runs: its containers (init containers, entrypoint, config files,
  secrets, environment) start on loopback with the rendered configuration, every probe
  answers 200, a completion with the demo API key succeeds, and the lifecycle hooks drain
  and undrain the cluster and drain an attention node.
"""
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from cluster import BIN, TMP, Checks, free_port  # noqa: E402

ROOT = os.environ.get("ROOT", os.getcwd())
K8S = os.path.join(ROOT, "tests", "k8s")
VALIDATE = os.path.join(K8S, "validate.js")
OVERLAYS = os.path.join(ROOT, "deploy", "overlays")
ck = Checks()


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def fail_all(why):
    ck.check(why, False)
    sys.exit(ck.done())


for tool in ("kubectl", "node"):
    if not shutil.which(tool):
        fail_all(f"{tool} is installed (make deps)")
if not os.path.isdir(os.path.join(K8S, "node_modules", "kubernetes-models")):
    fail_all("tests/k8s/node_modules is installed (make deps)")

# ---- the validator can fail ----
fx = os.path.join(K8S, "fixtures")
for name, needle in (
        ("unknown-field.yaml", "unknown field .spec.template.spec.containers[0].livenessProbes"),
        ("wrong-type.yaml", "data/spec/replicas must be integer"),
        ("Dockerfile.bad", "runs as root")):
    args = ["--dockerfile"] if name.startswith("Dockerfile") else []
    r = run(["node", VALIDATE] + args + [os.path.join(fx, name)])
    ck.check(f"the validator rejects tests/k8s/fixtures/{name}", r.returncode == 1 and needle in r.stdout,
             r.stdout.strip()[-300:])

# ---- Dockerfiles ----
dockerfiles = sorted(os.path.join("docker", f) for f in os.listdir(os.path.join(ROOT, "docker"))
                     if f.startswith("Dockerfile"))
r = run(["node", VALIDATE, "--dockerfile"] + dockerfiles, cwd=ROOT)
ck.check(f"{', '.join(dockerfiles)} pass the image rules", r.returncode == 0, r.stdout.strip())
# the commands every image installs from docker/ (the entrypoint and the hooks)
image_cmds = None
for d in dockerfiles:
    cmds = set(re.findall(r"^COPY docker/\S+ /usr/local/bin/(\S+)$", open(os.path.join(ROOT, d)).read(), re.M))
    image_cmds = cmds if image_cmds is None else image_cmds & cmds
image_cmds = image_cmds or set()

# ---- what the binaries accept ----
BINARIES = {b for b in os.listdir(BIN) if os.access(os.path.join(BIN, b), os.X_OK)}
OPT_RE = re.compile(r"^\s+--([a-z0-9-]+)(?: ([A-Z]+))?\s{2,}", re.M)


def options(binary):
    """{name: takes_value} from the binary's --help options table."""
    out = run([os.path.join(BIN, binary), "--help"]).stdout
    return {m.group(1): bool(m.group(2)) for m in OPT_RE.finditer(out)}


OPTS = {b: options(b) for b in ("afd_coordinator", "attn_node", "ffn_node", "afd_mkmodel")}
ctl_help = run([os.path.join(BIN, "afdctl"), "status", "--help"]).stdout
SCRIPT_ENV = set(re.findall(r"\$AFD_[A-Z_]+", ctl_help))
for s in ("afd-entrypoint.sh", "afd-drain.sh"):
    head = "".join(ln for ln in open(os.path.join(ROOT, "docker", s)) if ln.startswith("#"))
    SCRIPT_ENV |= set("$" + v for v in re.findall(r"AFD_[A-Z_]+", head))
SCRIPT_ENV = {v[1:] for v in SCRIPT_ENV}
hook_usage = re.search(r"usage: afd-drain (.*)\"", open(os.path.join(ROOT, "docker", "afd-drain.sh")).read())
HOOK_CMDS = set(re.findall(r"\b([a-z]+)\b(?: \[NAME\])?(?: \||$)", hook_usage.group(1))) if hook_usage else set()
ucx_vars = None
if shutil.which("ucx_info"):
    ucx_vars = set(re.findall(r"^(UCX_[A-Z0-9_]+)=", run(["ucx_info", "-c", "-f"]).stdout, re.M))
# the paths each daemon serves on each of its ports (proved by the cpu-demo run below)
PATHS = {("afd_coordinator", "port"): {"/health", "/ready", "/metrics"},
         ("attn_node", "metrics-port"): {"/health", "/metrics"},
         ("ffn_node", "metrics-port"): {"/health", "/metrics"}}


def env_name(opt):
    return "AFD_" + opt.upper().replace("-", "_")


# ---- rendering, schema ----
def render(overlay):
    out = os.path.join(TMP, overlay + ".yaml")
    r = run(["kubectl", "kustomize", os.path.join(OVERLAYS, overlay)])
    if r.returncode:
        return None, r.stderr.strip()
    open(out, "w").write(r.stdout)
    js = os.path.join(TMP, overlay + ".json")
    v = run(["node", VALIDATE, "--json", js, out])
    bad = [ln for ln in v.stdout.splitlines() if not ln.startswith("valid ")]
    return (json.load(open(js)) if os.path.exists(js) else None), (v.returncode, bad, v.stderr.strip())


class Pod:
    """One container of a rendered workload, resolved as the kubelet would."""

    def __init__(self, objs, wl, c, init, ordinal=0):
        self.objs, self.wl, self.c, self.init = objs, wl, c, init
        self.spec = wl["spec"]["template"]["spec"]
        self.name = wl["metadata"]["name"] + (f"-{ordinal}" if wl["kind"] == "StatefulSet" else "-0")
        cmd = (c.get("command") or []) + (c.get("args") or [])
        self.wrapper = None
        if cmd and cmd[0] == "afd-entrypoint":
            self.wrapper, cmd = cmd[0], cmd[1:]
        self.daemon, self.argv = (cmd[0], cmd[1:]) if cmd else (None, [])

    def find(self, kind, name):
        for o in self.objs:
            if o["kind"] == kind and o["metadata"]["name"] == name:
                return o
        return None

    def secret(self, name, key):
        s = self.find("Secret", name) or {}
        if key in s.get("stringData", {}):
            return s["stringData"][key]
        if key in s.get("data", {}):
            return base64.b64decode(s["data"][key]).decode()
        return None

    def env(self):
        """{name: value}; value None when a reference does not resolve."""
        env = {}
        for ef in self.c.get("envFrom", []):
            cm = self.find("ConfigMap", ef.get("configMapRef", {}).get("name"))
            env.update(cm.get("data", {}) if cm else {"<missing ConfigMap>": None})
        for e in self.c.get("env", []):
            vf = e.get("valueFrom")
            if not vf:
                env[e["name"]] = e.get("value", "")
            elif "secretKeyRef" in vf:
                env[e["name"]] = self.secret(vf["secretKeyRef"]["name"], vf["secretKeyRef"]["key"])
            elif "fieldRef" in vf:
                env[e["name"]] = self.name if vf["fieldRef"]["fieldPath"] == "metadata.name" else "x"
            elif "configMapKeyRef" in vf:
                cm = self.find("ConfigMap", vf["configMapKeyRef"]["name"]) or {}
                env[e["name"]] = cm.get("data", {}).get(vf["configMapKeyRef"]["key"])
        return env

    def file(self, path):
        """The contents of a file in a ConfigMap or Secret volume, or None."""
        for m in self.c.get("volumeMounts", []):
            mp = m["mountPath"].rstrip("/") + "/"
            if not path.startswith(mp):
                continue
            vol = next((v for v in self.spec.get("volumes", []) if v["name"] == m["name"]), {})
            key = path[len(mp):]
            if "configMap" in vol:
                cm = self.find("ConfigMap", vol["configMap"]["name"]) or {}
                return cm.get("data", {}).get(key)
            if "secret" in vol:
                items = vol["secret"].get("items")
                k = next((i["key"] for i in items if i["path"] == key), None) if items else key
                return self.secret(vol["secret"]["secretName"], k) if k else None
        return None

    def ports(self):
        return {p.get("name"): p["containerPort"] for p in self.c.get("ports", [])}


def config_lines(text):
    for ln in text.splitlines():
        ln = ln.strip()
        if ln and not ln.startswith("#"):
            name, _, value = ln.partition("=")
            yield name.strip(), value.strip()


def check_flags(p, errs):
    """Every flag, config option and variable given to the daemon is one it knows."""
    opts = OPTS.get(p.daemon)
    if opts is None:
        errs.append(f"{p.name}/{p.c['name']}: runs {p.daemon}, not one of the binaries with options")
        return None
    configs, i = [], 0
    while i < len(p.argv):
        a = p.argv[i]
        if not a.startswith("--"):
            errs.append(f"{p.name}: argument {a!r} is not an option")
            i += 1
            continue
        name, eq, val = a[2:].partition("=")
        if name not in opts:
            errs.append(f"{p.name}: {p.daemon} has no option --{name}")
        elif opts[name] and not eq:
            i += 1
            val = p.argv[i] if i < len(p.argv) else None
        if name == "config":
            configs.append(val)
        i += 1
    files = {}
    for path in configs:
        text = p.file(path or "")
        if text is None:
            errs.append(f"{p.name}: --config {path} is not a file of a mounted ConfigMap")
            continue
        files[path] = text
        for name, _ in config_lines(text):
            if name not in opts or name in ("config", "help", "print-config"):
                errs.append(f"{p.name}: {path}: {p.daemon} has no option '{name}'")
    env = p.env()
    known_env = {env_name(o) for o in opts} | SCRIPT_ENV
    for k, v in env.items():
        if v is None:
            errs.append(f"{p.name}: variable {k} refers to a missing Secret or ConfigMap key")
        elif k.startswith("AFD_") and k not in known_env:
            errs.append(f"{p.name}: {k} is neither an option of {p.daemon} nor read by afdctl or the scripts")
        elif k.startswith("UCX_") and ucx_vars is not None and k not in ucx_vars:
            errs.append(f"{p.name}: {k} is not a UCX variable (ucx_info -c)")
    # the daemon's own parser on the whole configuration
    tmp = os.path.join(TMP, "print-config")
    os.makedirs(tmp, exist_ok=True)
    argv, eff = [], {}
    for a in p.argv:
        argv.append(os.path.join(tmp, os.path.basename(a)) if a in files else a)
    for path, text in files.items():
        open(os.path.join(tmp, os.path.basename(path)), "w").write(text)
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    clean.update({k: v for k, v in env.items() if v is not None})
    r = run([os.path.join(BIN, p.daemon)] + argv + ["--print-config"], env=clean)
    if r.returncode:
        errs.append(f"{p.name}: {p.daemon} refuses the configuration: {r.stderr.strip()}")
        return None
    for name, value in config_lines(r.stdout):
        eff[name] = value
    return eff


def service_target(objs, host, port):
    """(Service, the container port number it sends port to, the selected pod) or None."""
    name = host.split(".")[0]
    svc = next((o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == name), None)
    if not svc:
        return None
    sp = next((x for x in svc["spec"]["ports"] if x["port"] == port), None)
    if not sp:
        return None
    sel = svc["spec"].get("selector", {})
    for o in objs:
        if o["kind"] not in ("Deployment", "StatefulSet"):
            continue
        labels = o["spec"]["template"]["metadata"].get("labels", {})
        if all(labels.get(k) == v for k, v in sel.items()):
            for c in o["spec"]["template"]["spec"]["containers"]:
                cp = {q.get("name"): q["containerPort"] for q in c.get("ports", [])}
                t = sp.get("targetPort", port)
                if isinstance(t, str) and t in cp:
                    return svc, cp[t], o
                if isinstance(t, int) and t in cp.values():
                    return svc, t, o
    return None


def check_overlay(overlay, objs):
    errs = []
    workloads = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    pods, eff = [], {}
    for wl in workloads:
        spec = wl["spec"]["template"]["spec"]
        for init, key in ((True, "initContainers"), (False, "containers")):
            for c in spec.get(key, []):
                p = Pod(objs, wl, c, init)
                pods.append(p)
                if p.wrapper and p.wrapper not in image_cmds:
                    errs.append(f"{p.name}: {p.wrapper} is not installed by every Dockerfile")
                if p.daemon not in BINARIES:
                    errs.append(f"{p.name}/{c['name']}: {p.daemon} is not a built binary")
                    continue
                e = check_flags(p, errs)
                if e is not None and not init:
                    eff[wl["metadata"]["name"]] = (p, e)
    drain = {}
    for wname, (p, e) in eff.items():
        port_opts = {k: int(v) for k, v in e.items() if k.endswith("port") and re.fullmatch(r"-?\d+", v)}
        cports = p.ports()
        for pname, num in cports.items():
            if num not in port_opts.values():
                errs.append(f"{wname}: containerPort {pname}={num} is none of {p.daemon}'s ports {port_opts}")
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            pr = p.c.get(kind)
            if not pr:
                continue
            hg = pr.get("httpGet")
            if not hg:
                errs.append(f"{wname}: {kind} is not an HTTP probe")
                continue
            num = cports.get(hg["port"]) if isinstance(hg["port"], str) else hg["port"]
            opt = next((k for k, v in port_opts.items() if v == num), None)
            if opt is None:
                errs.append(f"{wname}: {kind} port {hg['port']} is none of {p.daemon}'s ports")
            elif hg["path"] not in PATHS.get((p.daemon, opt), ()):
                errs.append(f"{wname}: {kind} GET {hg['path']} is not served on {p.daemon}'s --{opt}")
        ann = p.wl["spec"]["template"]["metadata"].get("annotations", {})
        if "prometheus.io/port" in ann:
            opt = next((k for k, v in port_opts.items() if v == int(ann["prometheus.io/port"])), None)
            if ann.get("prometheus.io/path") not in PATHS.get((p.daemon, opt), ()):
                errs.append(f"{wname}: prometheus.io annotations name no metrics endpoint")
        env = p.env()
        # an FFN pod runs one tensor-parallel rank on each GPU it is given
        gpus = p.c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        if p.daemon == "ffn_node" and gpus is not None:
            if e.get("backend") != "cuda" or e.get("tp") != str(gpus):
                errs.append(f"{wname}: ffn_node has {gpus} GPUs but runs backend "
                            f"{e.get('backend')} with tp {e.get('tp')}")
        # an attention node drives one GPU: more in its pod would sit idle
        if p.daemon == "attn_node" and gpus is not None:
            if e.get("backend") != "cuda" or str(gpus) != "1":
                errs.append(f"{wname}: attn_node has {gpus} GPUs and backend "
                            f"{e.get('backend')}; it drives one GPU")
        if p.daemon == "afd_coordinator":
            if e.get("host") not in ("0.0.0.0", "::"):
                errs.append(f"{wname}: the coordinator listens on {e.get('host')}, not every address")
            for role, binary in (("attn", "attn_node"), ("ffn", "ffn_node")):
                sts = [o for o in workloads if o["kind"] == "StatefulSet" and
                       o["spec"]["template"]["spec"]["containers"][0].get("args", [""])[0] == binary]
                n = sum(o["spec"].get("replicas", 1) for o in sts)
                if int(e[role]) != n:
                    errs.append(f"{wname}: --{role} {e[role]} but the StatefulSets run {n} {binary}")
            drain["coordinator"] = int(e["drain-timeout-s"])
            url = env.get("AFD_ADMIN_URL", "")
            if url != f"http://127.0.0.1:{e['admin-port']}":
                errs.append(f"{wname}: AFD_ADMIN_URL {url} is not this pod's admin port")
        else:
            host, _, port = e.get("coordinator", "").rpartition(":")
            t = service_target(objs, host, int(port or 0))
            coord = eff.get(t[2]["metadata"]["name"]) if t else None
            if not coord or coord[0].daemon != "afd_coordinator" or t[1] != int(coord[1]["ctrl-port"]):
                errs.append(f"{wname}: --coordinator {e.get('coordinator')} is not the coordinator's control port")
            m = re.fullmatch(r"http://([a-z0-9.-]+):(\d+)", env.get("AFD_ADMIN_URL", ""))
            t = service_target(objs, m.group(1), int(m.group(2))) if m else None
            coord = eff.get(t[2]["metadata"]["name"]) if t else None
            if not coord or t[1] != int(coord[1]["admin-port"]):
                errs.append(f"{wname}: AFD_ADMIN_URL {env.get('AFD_ADMIN_URL')} is not the coordinator's admin API")
        lc = p.c.get("lifecycle", {})
        for hook in ("preStop", "postStart"):
            cmd = lc.get(hook, {}).get("exec", {}).get("command")
            if not cmd:
                continue
            if cmd[0] not in image_cmds or len(cmd) < 2 or cmd[1] not in HOOK_CMDS:
                errs.append(f"{wname}: {hook} {cmd} is not an afd-drain command of the image")
            # an FFN pod that stops or starts must not drain the cluster, nor undo a drain
            # an operator made: the coordinator recomputes what was in flight instead
            if p.daemon == "ffn_node" and len(cmd) > 1 and cmd[1] in ("cluster", "undrain"):
                errs.append(f"{wname}: an FFN pod's {hook} hook runs afd-drain {cmd[1]}")
        if lc.get("preStop"):
            t = int(env.get("AFD_DRAIN_TIMEOUT_S", "30"))
            drain[wname] = t
            grace = p.spec.get("terminationGracePeriodSeconds", 30)
            if grace < t + 15:
                errs.append(f"{wname}: terminationGracePeriodSeconds {grace} leaves no room for the "
                            f"{t} s drain")
        for m in p.c.get("volumeMounts", []):
            if m["mountPath"] == "/models" and not m.get("readOnly"):
                errs.append(f"{wname}: the model volume is mounted writable")
    if "coordinator" in drain and any(v != drain["coordinator"] for v in drain.values()):
        errs.append(f"the hooks' drain timeouts differ from the coordinator's: {drain}")
    for o in objs:
        if o["kind"] == "Service":
            for sp in o["spec"]["ports"]:
                if not service_target(objs, o["metadata"]["name"], sp["port"]):
                    errs.append(f"Service {o['metadata']['name']} port {sp['port']} reaches no container port")
        if o["kind"] == "ServiceMonitor":
            sel = o["spec"]["selector"]
            svcs = [s for s in objs if s["kind"] == "Service" and all(
                s["metadata"].get("labels", {}).get(k) == v for k, v in sel.get("matchLabels", {}).items())]
            for ep in o["spec"]["endpoints"]:
                if not any(any(sp.get("name") == ep["port"] for sp in s["spec"]["ports"]) for s in svcs):
                    errs.append(f"ServiceMonitor {o['metadata']['name']}: no selected Service has port {ep['port']}")
    return errs, pods, eff


overlays = sorted(d for d in os.listdir(OVERLAYS) if os.path.isfile(os.path.join(OVERLAYS, d, "kustomization.yaml")))
rendered = {}
for ov in overlays:
    objs, res = render(ov)
    if objs is None and isinstance(res, str):
        ck.check(f"{ov}: kubectl kustomize renders it", False, res)
        continue
    rc, bad, stderr = res
    ck.check(f"{ov}: renders, and its {len(objs or [])} objects are valid with no unknown field", rc == 0 and objs,
             "; ".join(bad)[:2000] + stderr)
    if objs:
        errs, pods, eff = check_overlay(ov, objs)
        ck.check(f"{ov}: flags, config files, variables, probes, ports, hooks match the binaries", not errs,
                 "; ".join(errs))
        rendered[ov] = (objs, pods, eff)

# the hook rule can fail: an FFN pod given the old cluster-wide drain hooks is refused
if "gpu-2a2f" in rendered:
    import copy
    objs = copy.deepcopy(rendered["gpu-2a2f"][0])
    for o in objs:
        c = o.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [{}])[0]
        if o["kind"] == "StatefulSet" and c.get("args", [""])[0] == "ffn_node":
            c["lifecycle"] = {"preStop": {"exec": {"command": ["afd-drain", "cluster"]}},
                              "postStart": {"exec": {"command": ["afd-drain", "undrain"]}}}
    errs = check_overlay("gpu-2a2f", objs)[0]
    ck.check("an FFN pod with cluster drain/undrain hooks is refused",
             any("preStop hook runs afd-drain cluster" in e for e in errs) and
             any("postStart hook runs afd-drain undrain" in e for e in errs), "; ".join(errs))

# the GPU rule can fail: an FFN pod whose GPU count differs from its ranks is refused
if "gpu-2a2f" in rendered:
    import copy
    objs = copy.deepcopy(rendered["gpu-2a2f"][0])
    for o in objs:
        c = o.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [{}])[0]
        if o["kind"] == "StatefulSet" and c.get("args", [""])[0] == "ffn_node":
            c["resources"]["limits"]["nvidia.com/gpu"] = "4"
            c["resources"].setdefault("requests", {})["nvidia.com/gpu"] = "4"
    for o in objs:
        c = o.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [{}])[0]
        if o["kind"] == "StatefulSet" and c.get("args", [""])[0] == "attn_node":
            c["resources"]["limits"]["nvidia.com/gpu"] = "8"
            c["resources"].setdefault("requests", {})["nvidia.com/gpu"] = "8"
    errs = check_overlay("gpu-2a2f", objs)[0]
    ck.check("an attention pod with 8 GPUs is refused (it would use one)",
             any("attn_node has 8 GPUs and backend cuda; it drives one GPU" in e for e in errs),
             "; ".join(errs))
    ck.check("an FFN pod with 4 GPUs and 8 ranks is refused",
             any("has 4 GPUs but runs backend cuda with tp 8" in e for e in errs), "; ".join(errs))

# ---- the entrypoint refuses the placeholder secrets ----
with open(os.path.join(TMP, "keys"), "w") as f:
    f.write("REPLACE-ME-api-key\n")
envp = {"PATH": f"{BIN}:{os.environ['PATH']}", "AFD_CLUSTER_TOKEN": "REPLACE-ME-cluster-token"}
r = run(["sh", os.path.join(ROOT, "docker", "afd-entrypoint.sh"), "afd_coordinator", "--help"], env=envp)
r2 = run(["sh", os.path.join(ROOT, "docker", "afd-entrypoint.sh"), "afd_coordinator", "--api-keys-file",
          os.path.join(TMP, "keys"), "--help"], env={"PATH": envp["PATH"]})
r3 = run(["sh", os.path.join(ROOT, "docker", "afd-entrypoint.sh"), "afd_coordinator", "--help"],
         env={"PATH": envp["PATH"], "AFD_CLUSTER_TOKEN": "a-real-token"})
ck.check("afd-entrypoint refuses placeholder secrets and starts the daemon otherwise",
         r.returncode == 2 and r2.returncode == 2 and r3.returncode == 0 and "usage: afd_coordinator" in r3.stdout,
         f"{r.returncode} {r2.returncode} {r3.returncode}")


# ---- cpu-demo on loopback ----
def http(url, data=None, headers=None, timeout=10):
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return None, b""


def wait_for(pred, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.2)
    return False


procs = []


def demo():
    objs = rendered["cpu-demo"][0]
    hooks_dir = os.path.join(TMP, "image-bin")
    os.makedirs(hooks_dir, exist_ok=True)
    for name, script in (("afd-entrypoint", "afd-entrypoint.sh"), ("afd-drain", "afd-drain.sh")):
        dst = os.path.join(hooks_dir, name)
        if not os.path.exists(dst):
            os.symlink(os.path.join(ROOT, "docker", script), dst)
    path = f"{hooks_dir}:{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    # every pod, its containers, and free local ports for its container ports
    pods = []
    for wl in (o for o in objs if o["kind"] in ("Deployment", "StatefulSet")):
        n = wl["spec"].get("replicas", 1)
        for i in range(n):
            spec = wl["spec"]["template"]["spec"]
            inits = [Pod(objs, wl, c, True, i) for c in spec.get("initContainers", [])]
            main = [Pod(objs, wl, c, False, i) for c in spec["containers"]]
            ports = {num: free_port() for c in main for num in c.ports().values()}
            pods.append((main[0].name, inits, main[0], ports))
    by_wl = {}
    for name, _, p, ports in pods:
        by_wl.setdefault(p.wl["metadata"]["name"], []).append(ports)

    def svc_addr(m):
        t = service_target(objs, m.group(1), int(m.group(3)))
        if not t:
            return m.group(0)
        return f"127.0.0.1:{by_wl[t[2]['metadata']['name']][0][t[1]]}"

    svc_re = re.compile(r"\b(" + "|".join(re.escape(o["metadata"]["name"]) for o in objs if o["kind"] == "Service")
                        + r")(\.[a-z0-9.-]+)?:(\d+)\b")

    def localize(p, ports, value, root):
        """A manifest value as it reads on this machine: volume paths, ports, Service addresses."""
        best = None
        for m in p.c.get("volumeMounts", []):
            mp = m["mountPath"].rstrip("/")
            if (value == mp or value.startswith(mp + "/")) and (not best or len(mp) > len(best[0])):
                best = (mp, m["name"])
        if best:
            value = os.path.join(root, best[1]) + value[len(best[0]):]
        value = re.sub(r"\b(127\.0\.0\.1|localhost):(\d+)\b",
                       lambda m: f"127.0.0.1:{ports.get(int(m.group(2)), m.group(2))}", value)
        return svc_re.sub(svc_addr, value)

    def start(name, p, ports, wait):
        root = os.path.join(TMP, "pods", name)
        for m in p.c.get("volumeMounts", []):
            d = os.path.join(root, m["name"])
            os.makedirs(d, exist_ok=True)
        env = {"PATH": path}
        env.update({k: localize(p, ports, v, root) for k, v in p.env().items()})
        argv = []
        prev = None
        for a in p.argv:
            if prev == "--config":
                text = p.file(a)
                lines = []
                for k, v in config_lines(text):
                    if k.endswith("port") and v.isdigit() and int(v) in ports:
                        v = str(ports[int(v)])
                    lines.append(f"{k} = {localize(p, ports, v, root)}")
                a = os.path.join(root, os.path.basename(a))
                open(a, "w").write("\n".join(lines) + "\n")
            elif prev and prev.endswith("port") and a.isdigit() and int(a) in ports:
                a = str(ports[int(a)])
            else:
                a = localize(p, ports, a, root)
            argv.append(a)
            prev = a
        # Secret volumes: the files the daemon reads
        for m in p.c.get("volumeMounts", []):
            vol = next(v for v in p.spec["volumes"] if v["name"] == m["name"])
            if "secret" in vol:
                for it in vol["secret"].get("items", []):
                    with open(os.path.join(root, m["name"], it["path"]), "w") as f:
                        f.write(p.secret(vol["secret"]["secretName"], it["key"]))
        cmd = ([p.wrapper] if p.wrapper else []) + [p.daemon] + argv
        log = open(os.path.join(TMP, f"{name}-{p.c['name']}.log"), "w")
        pr = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            return pr.wait(timeout=60) == 0
        procs.append((name, pr))
        return env

    envs = {}
    for name, inits, p, ports in pods:
        ok = all(start(name, ip, ports, True) for ip in inits)
        ck.check(f"cpu-demo: {name}'s init containers run", ok)
        envs[name] = (start(name, p, ports, False), p, ports)
        if p.daemon == "afd_coordinator":
            time.sleep(0.3)

    # every probe, on its pod's port
    for name, (env, p, ports) in envs.items():
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            pr = p.c.get(kind)
            if not pr:
                continue
            hg = pr["httpGet"]
            num = p.ports()[hg["port"]] if isinstance(hg["port"], str) else hg["port"]
            url = f"http://127.0.0.1:{ports[num]}{hg['path']}"
            ok = wait_for(lambda: http(url)[0] == 200 or any(q.poll() is not None for _, q in procs), 60)
            ok = ok and http(url)[0] == 200
            ck.check(f"cpu-demo: {name} {kind} GET {hg['path']} on port {hg['port']} answers 200", ok)
    coord = next(v for v in envs.values() if v[1].daemon == "afd_coordinator")
    cenv, cp, cports = coord
    api = f"http://127.0.0.1:{cports[cp.ports()['http']]}"
    # the paths the static checks allow on each port are the ones served there
    for (daemon, opt), paths in PATHS.items():
        for name, (env, p, ports) in envs.items():
            if p.daemon != daemon:
                continue
            num = int(rendered["cpu-demo"][2][p.wl["metadata"]["name"]][1][opt])
            for path_ in sorted(paths):
                st, _ = http(f"http://127.0.0.1:{ports[num]}{path_}")
                ck.check(f"cpu-demo: {name} serves {path_} on its --{opt}", st == 200, str(st))
            break
    key = next(k for k in cp.secret("afd-secrets", "api-keys").splitlines() if k and not k.startswith("#"))
    body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}).encode()
    st, out = http(api + "/v1/completions", body, {"Content-Type": "application/json",
                                                    "Authorization": f"Bearer {key}"}, 60)
    st2, _ = http(api + "/v1/completions", body, {"Content-Type": "application/json"}, 60)
    ck.check("cpu-demo: a completion with the Secret's API key succeeds, one without is refused",
             st == 200 and st2 == 401, f"{st} {st2} {out[:200]!r}")

    def hook(name, which):
        env, p, _ = envs[name]
        cmd = p.c["lifecycle"][which]["exec"]["command"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)

    ffn = next(n for n, v in envs.items() if v[1].daemon == "ffn_node")
    attn = [n for n, v in envs.items() if v[1].daemon == "attn_node"][-1]  # as a scale-down would
    r = hook(cp_name, "preStop")
    ck.check("cpu-demo: the coordinator's preStop hook drains the cluster (/ready 503)",
             r.returncode == 0 and http(api + "/ready")[0] == 503, r.stderr)
    ck.check("cpu-demo: FFN pods have no lifecycle hook (a restart is recomputed, not drained)",
             not envs[ffn][1].c.get("lifecycle"), str(envs[ffn][1].c.get("lifecycle")))
    r = subprocess.run(["afd-drain", "undrain"], env=cenv, capture_output=True, text=True,
                       timeout=60)
    ck.check("cpu-demo: afd-drain undrain (the operator's) admits requests again (/ready 200)",
             r.returncode == 0 and wait_for(lambda: http(api + "/ready")[0] == 200, 10), r.stderr)
    r = hook(attn, "preStop")
    ctl = subprocess.run(["afdctl", "nodes"], env=envs[attn][0], capture_output=True, text=True)
    row = next((ln.split() for ln in ctl.stdout.splitlines()[1:] if ln.split()[3:4] == [attn]), [])
    ck.check("cpu-demo: an attention node's preStop hook drains it out of the data plane",
             r.returncode == 0 and row[4:5] == ["drained"], r.stderr + ctl.stdout)
    pr = next(pr for n, pr in procs if n == cp_name)
    pr.send_signal(signal.SIGTERM)
    try:
        rc = pr.wait(timeout=int(cenv.get("AFD_DRAIN_TIMEOUT_S", "30")) + 10)
    except subprocess.TimeoutExpired:
        rc = None
    ck.check("cpu-demo: SIGTERM stops the coordinator cleanly within the drain timeout", rc == 0, str(rc))


if "cpu-demo" in rendered:
    cp_name = next(p.name for p in rendered["cpu-demo"][1] if p.daemon == "afd_coordinator" and not p.init)
    try:
        demo()
    finally:
        for _, pr in procs:
            if pr.poll() is None:
                pr.kill()
                pr.wait()
else:
    ck.check("the cpu-demo overlay renders (needed for the loopback run)", False)

sys.exit(ck.done())
