// Copies libsodium's browser build (ES modules) from node_modules into the Python package, so
// that the server ships the web client without any build tool at run time.
// `node build.mjs` writes the files; `node build.mjs --check` fails if the committed copies
// differ from what package-lock.json installs (run after `npm ci`).
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const vendor = join(here, "..", "construct", "web", "static", "vendor");
const modules = join(here, "node_modules");

const wrappers = readFileSync(join(modules, "libsodium-wrappers-sumo/dist/modules-sumo-esm/libsodium-wrappers.mjs"), "utf8");
// The browser has no package resolution: point the bare specifier at the copy beside it.
const rewritten = wrappers.replace('from"libsodium-sumo"', 'from"./libsodium-sumo.mjs"');
if (rewritten === wrappers) throw new Error("libsodium-wrappers no longer imports libsodium-sumo as expected");

const license = ["libsodium-sumo", "libsodium-wrappers-sumo"]
  .map((name) => `${name} ${JSON.parse(readFileSync(join(modules, name, "package.json"))).version}\n\n` +
    readFileSync(join(modules, name, "LICENSE"), "utf8"))
  .join("\n");

const outputs = {
  "libsodium-sumo.mjs": readFileSync(join(modules, "libsodium-sumo/dist/modules-sumo-esm/libsodium-sumo.mjs"), "utf8"),
  "libsodium-wrappers.mjs": rewritten,
  "LICENSE.txt": license,
};

if (process.argv.includes("--check")) {
  const stale = Object.entries(outputs).filter(([name, text]) => {
    try { return readFileSync(join(vendor, name), "utf8") !== text; } catch { return true; }
  });
  if (stale.length) {
    console.error(`out of date in ${vendor}: ${stale.map(([name]) => name).join(", ")}; run npm run build`);
    process.exit(1);
  }
  console.log("vendored libsodium matches package-lock.json");
} else {
  for (const [name, text] of Object.entries(outputs)) writeFileSync(join(vendor, name), text);
  console.log(`wrote ${Object.keys(outputs).join(", ")} to ${vendor}`);
}
