#!/usr/bin/env node
// Offline checks of the deployment files.
//
//   node validate.js [--json OUT] FILE.yaml...   Kubernetes objects (multi-document YAML, as
//       `kubectl kustomize` renders them): each is validated against the Kubernetes API
//       schema of kubernetes-models (the prometheus-operator's for ServiceMonitors), and any
//       field the schema does not define is an error too (kubernetes-models lets unknown
//       fields pass: every key the schema's validator never looked at is unknown). --json
//       writes the objects as one JSON array.
//   node validate.js --dockerfile FILE...         Dockerfiles: dockerfile-utils' validator
//       with every rule an error, plus the image rules listed at lintDockerfile below.
//
// Prints one line per object or file, "valid ..." or "invalid ...: reasons"; exits 1 when
// anything is invalid, 2 on a usage or read error.
'use strict';
const fs = require('fs');
const path = require('path');
const YAML = require('yaml');

function usage() {
    console.error('usage: validate.js [--json OUT] FILE.yaml... | --dockerfile FILE...');
    process.exit(2);
}

// ---- Kubernetes objects ----

// The model class for an apiVersion and kind, or null when no schema is known.
function modelFor(apiVersion, kind) {
    if (typeof apiVersion !== 'string' || typeof kind !== 'string') return null;
    if (!/^([a-z0-9.-]+\/)?v[0-9]+((alpha|beta)[0-9]+)?$/.test(apiVersion)) return null;
    if (!/^[A-Z][A-Za-z0-9]*$/.test(kind)) return null;
    const mods =
        apiVersion.startsWith('monitoring.coreos.com/')
            ? [`@kubernetes-models/prometheus-operator/${apiVersion}/${kind}`]
            : [`kubernetes-models/${apiVersion}/${kind}`];
    for (const m of mods) {
        try {
            const cls = require(m)[kind];
            if (cls && cls.apiVersion === apiVersion && cls.kind === kind) return cls;
        } catch (e) {
            if (e.code !== 'MODULE_NOT_FOUND' && e.code !== 'ERR_PACKAGE_PATH_NOT_EXPORTED') throw e;
        }
    }
    return null;
}

// Wraps obj so that every property the validator reads is recorded in seen (per object).
function tracked(obj, seen) {
    const proxies = new WeakMap();
    const wrap = (o) => {
        if (o === null || typeof o !== 'object') return o;
        if (proxies.has(o)) return proxies.get(o);
        const p = new Proxy(o, {
            get(target, key, receiver) {
                if (typeof key === 'string') {
                    if (!seen.has(target)) seen.set(target, new Set());
                    seen.get(target).add(key);
                }
                return wrap(Reflect.get(target, key, receiver));
            },
        });
        proxies.set(o, p);
        return p;
    };
    return wrap(obj);
}

// Paths of the keys of obj that the validator never read (they are not in the schema).
function unknownFields(obj, seen, at, out) {
    if (Array.isArray(obj)) {
        obj.forEach((v, i) => unknownFields(v, seen, `${at}[${i}]`, out));
        return out;
    }
    if (obj === null || typeof obj !== 'object') return out;
    const read = seen.get(obj) || new Set();
    for (const k of Object.keys(obj)) {
        if (!read.has(k)) out.push(`${at}.${k}`);
        else unknownFields(obj[k], seen, `${at}.${k}`, out);
    }
    return out;
}

const DNS1123 = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;

// Returns the list of problems of one object (empty when valid).
function checkObject(obj) {
    if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) return ['not an object'];
    const cls = modelFor(obj.apiVersion, obj.kind);
    if (!cls) return [`no schema for apiVersion ${obj.apiVersion} kind ${obj.kind}`];
    const problems = [];
    const seen = new WeakMap();
    try {
        cls.prototype.validate.call(tracked(obj, seen));
    } catch (e) {
        problems.push(e.message);
    }
    for (const f of unknownFields(obj, seen, '', []))
        problems.push(`unknown field ${f}`);
    const name = obj.metadata && obj.metadata.name;
    if (typeof name !== 'string' || name.length > 253 || !DNS1123.test(name))
        problems.push(`metadata.name ${JSON.stringify(name)} is not a DNS-1123 name`);
    return problems;
}

function validateManifests(files, jsonOut) {
    let bad = 0;
    const all = [];
    for (const f of files) {
        const docs = YAML.parseAllDocuments(fs.readFileSync(f, 'utf8'));
        for (const d of docs) {
            if (d.errors.length) {
                console.log(`invalid ${f}: YAML: ${d.errors.map((e) => e.message).join('; ')}`);
                bad++;
                continue;
            }
            const obj = d.toJS();
            if (obj === null) continue; // an empty document
            all.push(obj);
            const what = `${obj.kind}/${obj.metadata && obj.metadata.name}`;
            const problems = checkObject(obj);
            if (problems.length) {
                console.log(`invalid ${what} (${f}): ${problems.join('; ')}`);
                bad++;
            } else {
                console.log(`valid ${what}`);
            }
        }
    }
    if (jsonOut) fs.writeFileSync(jsonOut, JSON.stringify(all, null, 1));
    return bad;
}

// ---- Dockerfiles ----

// Splits a Dockerfile into instructions {line, op, args} (continuations joined,
// comments and parser directives dropped).
function instructions(text) {
    const out = [];
    let cur = null;
    text.split('\n').forEach((raw, i) => {
        const line = raw.replace(/\r$/, '');
        if (!cur && /^\s*(#.*)?$/.test(line)) return;
        if (cur && /^\s*#/.test(line)) return; // comment inside a continuation
        const cont = /\\\s*$/.test(line);
        const body = line.replace(/\\\s*$/, '');
        if (!cur) {
            const m = /^\s*(\S+)\s*(.*)$/.exec(body);
            cur = { line: i + 1, op: m[1].toUpperCase(), args: m[2] };
        } else {
            cur.args += ' ' + body.trim();
        }
        if (!cont) {
            out.push(cur);
            cur = null;
        }
    });
    if (cur) out.push(cur);
    return out;
}

// The image rules (hadolint's most common ones, which no registry ships for Node.js):
//  - every FROM names a tag (ARG defaults resolved) that is not "latest", or a digest;
//  - the final stage ends as a non-root USER;
//  - apt-get install has -y and --no-install-recommends; apt-get upgrade is not used;
//    a RUN that runs apt-get update removes /var/lib/apt/lists/* in the same layer;
//  - RUN with a pipe runs under SHELL ["/bin/bash", "-o", "pipefail", ...];
//  - ADD fetches nothing from a URL; COPY --from names an earlier stage;
//  - every file COPY'd from the build context exists (paths relative to the context,
//    the repository root).
function lintDockerfile(file, context) {
    const text = fs.readFileSync(file, 'utf8');
    const problems = [];
    const utils = require('dockerfile-utils');
    const E = utils.ValidationSeverity.ERROR;
    const settings = {
        deprecatedMaintainer: E,
        directiveCasing: E,
        emptyContinuationLine: E,
        instructionCasing: E,
        instructionCmdMultiple: E,
        instructionEntrypointMultiple: E,
        instructionHealthcheckMultiple: E,
        instructionJSONInSingleQuotes: E,
        instructionWorkdirRelative: E,
    };
    for (const d of utils.validate(text, settings))
        problems.push(`line ${d.range.start.line + 1}: ${d.message}`);

    const args = {};
    const stages = [];
    let pipefail = false;
    let user = null;
    for (const ins of instructions(text)) {
        const at = `line ${ins.line}`;
        const expand = (s) => s.replace(/\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?/g, (m, v) => (v in args ? args[v] : m));
        if (ins.op === 'ARG') {
            const m = /^([A-Za-z_][A-Za-z0-9_]*)(=(.*))?$/.exec(ins.args.trim());
            if (m) args[m[1]] = (m[3] || '').replace(/^"(.*)"$/, '$1');
        } else if (ins.op === 'FROM') {
            const words = ins.args.split(/\s+/).filter((w) => !w.startsWith('--'));
            const image = expand(words[0]);
            const asName = words.length >= 3 && words[1].toUpperCase() === 'AS' ? words[2] : null;
            if (!stages.includes(image)) {
                const digest = image.includes('@sha256:');
                const tag = /:([^/:]+)$/.exec(image.split('@')[0]);
                if (!digest && !tag) problems.push(`${at}: FROM ${image} has no tag`);
                else if (tag && (tag[1] === 'latest' || tag[1].includes('$')))
                    problems.push(`${at}: FROM ${image}: pin a version, not ${tag[1]}`);
            }
            if (asName) stages.push(asName);
            user = null;
            pipefail = false;
        } else if (ins.op === 'SHELL') {
            pipefail = /pipefail/.test(ins.args);
        } else if (ins.op === 'USER') {
            user = ins.args.trim();
        } else if (ins.op === 'RUN') {
            const cmd = ins.args;
            if (/apt-get\s+(\S+\s+)*install/.test(cmd)) {
                if (!/--no-install-recommends/.test(cmd))
                    problems.push(`${at}: apt-get install without --no-install-recommends`);
                if (!/(\s-y\b|\s--yes\b|\s-[a-z]*y[a-z]*\b)/.test(cmd))
                    problems.push(`${at}: apt-get install without -y`);
            }
            if (/apt-get\s+(\S+\s+)*(upgrade|dist-upgrade)/.test(cmd))
                problems.push(`${at}: apt-get upgrade in an image build`);
            if (/apt-get\s+(\S+\s+)*update/.test(cmd) && !/rm -rf \/var\/lib\/apt\/lists/.test(cmd))
                problems.push(`${at}: apt-get update without removing /var/lib/apt/lists/* in the same RUN`);
            if (/[^|]\|[^|]/.test(cmd) && !pipefail)
                problems.push(`${at}: a pipe in RUN without SHELL [..., "-o", "pipefail", ...]`);
        } else if (ins.op === 'ADD') {
            if (/(https?|ftp):\/\//.test(ins.args)) problems.push(`${at}: ADD from a URL (use curl and check it)`);
        } else if (ins.op === 'COPY') {
            const words = ins.args.split(/\s+/);
            const from = words.find((w) => w.startsWith('--from='));
            if (from) {
                const st = from.slice(7);
                if (!stages.includes(st) && !/^[0-9]+$/.test(st))
                    problems.push(`${at}: COPY --from=${st}: no such stage`);
            } else {
                const srcs = words.filter((w) => !w.startsWith('--')).slice(0, -1);
                for (const s of srcs)
                    if (!fs.existsSync(path.join(context, s)))
                        problems.push(`${at}: COPY ${s}: not in the build context`);
            }
        }
    }
    if (user === null) problems.push('the final stage runs as root (no USER)');
    else if (/^(root|0)(:|$)/.test(user)) problems.push(`the final stage runs as ${user}`);
    return problems;
}

function main(argv) {
    if (!argv.length) usage();
    if (argv[0] === '--dockerfile') {
        if (argv.length < 2) usage();
        let bad = 0;
        for (const f of argv.slice(1)) {
            const context = path.resolve(__dirname, '..', '..');
            const problems = lintDockerfile(f, context);
            if (problems.length) {
                console.log(`invalid ${f}: ${problems.join('; ')}`);
                bad++;
            } else {
                console.log(`valid ${f}`);
            }
        }
        return bad ? 1 : 0;
    }
    let jsonOut = null;
    if (argv[0] === '--json') {
        if (argv.length < 3) usage();
        jsonOut = argv[1];
        argv = argv.slice(2);
    }
    return validateManifests(argv, jsonOut) ? 1 : 0;
}

try {
    process.exitCode = main(process.argv.slice(2));
} catch (e) {
    console.error(`validate.js: ${e.message}`);
    process.exitCode = 2;
}
