// Validates custom resources (Istio, Envoy Gateway, Gateway API) offline against the
// schemas their projects publish, as packaged by @kubernetes-models/*.
//
// Two checks per object, both from the same published CRD schemas:
//   1. `new Model(obj).validate()`: types, enums, required fields, patterns (ajv, compiled
//      from the CRD's OpenAPI schema).
//   2. Unknown fields. Those compiled validators accept any extra key, while a cluster
//      prunes it (or rejects it under kubectl's strict field validation) — so a typo such as
//      `failOpn: false` would pass check 1 and silently leave the default in force. The
//      packages also ship TypeScript declarations generated from the same schemas; the
//      TypeScript compiler resolves them and every key of the object is looked up in them.
//
// Usage: node validate-crs.mjs FILE...   (multi-document YAML allowed)
// Exit status 0 when every object passes; 1 with one line per problem otherwise.

import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { loadAll } from "js-yaml";
import ts from "typescript";

const here = path.dirname(fileURLToPath(import.meta.url));

// API group -> the npm package that ships its models.
function packageFor(group) {
  if (group === "gateway.envoyproxy.io") return "@kubernetes-models/envoy-gateway";
  if (group === "gateway.networking.k8s.io") return "@kubernetes-models/gateway-api";
  if (group.endsWith(".istio.io")) return "@kubernetes-models/istio";
  return null;
}

// CRDs whose published schema leaves `spec` open (x-kubernetes-preserve-unknown-fields):
// only their envelope is checked here; tests/deploy/schemas/ covers the parts we use.
const OPEN_SPEC = new Set(["install.istio.io/v1alpha1/IstioOperator"]);

const problems = [];
const objects = [];

for (const file of process.argv.slice(2)) {
  let docs;
  try {
    docs = loadAll(fs.readFileSync(file, "utf8"));
  } catch (e) {
    problems.push(`${file}: not YAML: ${e.message}`);
    continue;
  }
  for (const [i, obj] of docs.entries()) {
    if (obj == null) continue;
    const where = `${file}#${i} ${obj.kind}/${obj.metadata?.name}`;
    const [group, version] = String(obj.apiVersion ?? "").includes("/")
      ? obj.apiVersion.split("/")
      : ["", obj.apiVersion];
    const pkg = packageFor(group);
    if (!pkg) {
      problems.push(`${where}: no published model for apiVersion ${obj.apiVersion}`);
      continue;
    }
    const spec = `${pkg}/${group}/${version}/${obj.kind}`;
    const openSpec = OPEN_SPEC.has(`${group}/${version}/${obj.kind}`);
    const checked = { ...obj };
    if (openSpec) delete checked.spec;
    objects.push({ where, spec, obj: checked });
  }
}

// Check 1: the compiled JSON-schema validators.
for (const o of objects) {
  let Model;
  try {
    Model = (await import(o.spec))[o.obj.kind];
  } catch (e) {
    problems.push(`${o.where}: ${o.spec} not found (${e.code ?? e.message})`);
    continue;
  }
  try {
    new Model(o.obj).validate();
  } catch (e) {
    const details = (e.errors ?? []).map((x) => `${x.instancePath || "/"} ${x.message ?? x.keyword}`);
    problems.push(`${o.where}: ${e.message}${details.length ? ": " + details.join("; ") : ""}`);
  }
}

// Check 2: unknown fields, against the TypeScript declarations of the same models.
const known = objects.filter((o) => !problems.some((p) => p.startsWith(`${o.where}: ${o.spec} not found`)));
if (known.length) {
  const probe = path.join(here, "__validate_crs_probe.ts");
  const source = known
    .map((o, i) => `import type { I${o.obj.kind} as T${i} } from "${o.spec}";\nexport type Checked${i} = T${i};`)
    .join("\n");
  const host = ts.createCompilerHost({});
  const readSource = host.getSourceFile.bind(host);
  host.getSourceFile = (f, lang, ...rest) =>
    path.resolve(f) === probe ? ts.createSourceFile(f, source, lang, true) : readSource(f, lang, ...rest);
  const fileExists = host.fileExists.bind(host);
  host.fileExists = (f) => path.resolve(f) === probe || fileExists(f);
  const program = ts.createProgram(
    [probe],
    {
      strict: true,
      noEmit: true,
      skipLibCheck: true,
      types: [],
      target: ts.ScriptTarget.ES2022,
      module: ts.ModuleKind.NodeNext,
      moduleResolution: ts.ModuleResolutionKind.NodeNext,
    },
    host,
  );
  for (const d of ts.getPreEmitDiagnostics(program)) {
    problems.push(`type declarations: ${ts.flattenDiagnosticMessageText(d.messageText, " ")}`);
  }
  const checker = program.getTypeChecker();
  const aliases = program
    .getSourceFile(probe)
    .statements.filter((s) => ts.isTypeAliasDeclaration(s));
  known.forEach((o, i) => {
    const type = checker.getTypeFromTypeNode(aliases[i].type);
    walk(o.obj, type, "", o.where);
  });

  function walk(value, type, at, where) {
    type = checker.getNonNullableType(type);
    if (type.flags & (ts.TypeFlags.Any | ts.TypeFlags.Unknown)) return;
    if (Array.isArray(value)) {
      const item = elementType(type);
      if (!item) return; // a list where the schema wants something else: check 1 reports it
      value.forEach((v, n) => walk(v, item, `${at}[${n}]`, where));
      return;
    }
    if (value === null || typeof value !== "object") return;
    const members = type.isUnion() ? type.types : [type];
    for (const [key, v] of Object.entries(value)) {
      let next;
      for (const m of members) {
        const prop = checker.getPropertyOfType(m, key);
        if (prop) {
          next = checker.getTypeOfSymbol(prop);
          break;
        }
      }
      if (!next) {
        for (const m of members) {
          next = checker.getIndexTypeOfType(m, ts.IndexKind.String);
          if (next) break;
        }
      }
      if (!next) {
        problems.push(`${where}: unknown field ${at}.${key} (not in the published schema)`);
        continue;
      }
      walk(v, next, `${at}.${key}`, where);
    }
  }

  function elementType(type) {
    for (const m of type.isUnion() ? type.types : [type]) {
      if (checker.isArrayType(m)) return checker.getTypeArguments(m)[0];
      const idx = checker.getIndexTypeOfType(m, ts.IndexKind.Number);
      if (idx) return idx;
    }
    return undefined;
  }
}

for (const o of objects) {
  if (!problems.some((p) => p.startsWith(o.where))) console.log(`ok ${o.where} (${o.spec})`);
}
for (const p of problems) console.log(`FAIL ${p}`);
process.exit(problems.length ? 1 : 0);
