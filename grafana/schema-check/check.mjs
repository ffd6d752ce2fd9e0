// Typecheck Grafana dashboards against the pinned @grafana/schema with tsc --strict.
//
//   node check.mjs [dashboard.json ...]      (default: ../dashboards/*.json)
//
// Each dashboard becomes generated/<name>.ts, `export const dashboard: UgroDashboard = <JSON>;`
// (JSON is a TypeScript object literal, so excess-property checks apply to every
// nested object), then `tsc -p .` checks them all. Exit status: tsc's.
import { spawnSync } from "node:child_process";
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dashboards = resolve(here, "..", "dashboards");
const files = process.argv.length > 2
  ? process.argv.slice(2).map((f) => resolve(f))
  : readdirSync(dashboards).filter((f) => f.endsWith(".json")).sort().map((f) => join(dashboards, f));
if (files.length === 0) {
  console.error("check.mjs: no dashboards to check");
  process.exit(2);
}
const out = join(here, "generated");
rmSync(out, { recursive: true, force: true });
mkdirSync(out);
for (const file of files) {
  const text = readFileSync(file, "utf8");
  JSON.parse(text); // a JSON syntax error is reported here, with the file name
  const name = basename(file, ".json").replace(/[^A-Za-z0-9_-]/g, "_");
  writeFileSync(join(out, `${name}.ts`),
    `// generated from ${file}\nimport type { UgroDashboard } from "../types";\n\n` +
    `export const dashboard: UgroDashboard = ${text.trim()};\n`);
}
const tsc = join(here, "node_modules", "typescript", "bin", "tsc");
const result = spawnSync(process.execPath, [tsc, "-p", here, "--pretty", "false"], { stdio: "inherit" });
process.exit(result.status ?? 1);
