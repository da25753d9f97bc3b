// Copy LiteRT.js (from node_modules, installed by `npm ci` from package-lock.json) into the
// phone app's vendor folder, which the Python package ships: the page never loads a file from
// outside its own origin.
import { copyFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const vendor = join(here, "..", "edgetl", "device", "phone", "app", "vendor");
const core = join(here, "node_modules", "@litertjs", "core");
const utils = join(here, "node_modules", "@litertjs", "wasm-utils");
const files = [
  [join(core, "dist", "index.js"), "litert.js"],
  [join(utils, "dist", "index.js"), "wasm-utils.js"],
  ...["litert_wasm_internal", "litert_wasm_threaded_internal"].flatMap((n) => [
    [join(core, "wasm", `${n}.js`), `wasm/${n}.js`],
    [join(core, "wasm", `${n}.wasm`), `wasm/${n}.wasm`],
  ]),
  [join(core, "package.json"), "litert-package.json"],
];
rmSync(vendor, { recursive: true, force: true });
mkdirSync(join(vendor, "wasm"), { recursive: true });
for (const [src, dst] of files) copyFileSync(src, join(vendor, dst));
// One ES module the page imports by path: no import map for the bare specifier, no source map.
const core_js = readFileSync(join(vendor, "litert.js"), "utf8")
  .replace('from "@litertjs/wasm-utils"', 'from "./wasm-utils.js"')
  .replace(/\n\/\/# sourceMappingURL=.*\n?$/, "\n");
writeFileSync(join(vendor, "litert.js"), core_js);
const utils_js = readFileSync(join(vendor, "wasm-utils.js"), "utf8").replace(/\n\/\/# sourceMappingURL=.*\n?$/, "\n");
writeFileSync(join(vendor, "wasm-utils.js"), utils_js);
const version = JSON.parse(readFileSync(join(core, "package.json"), "utf8")).version;
console.log(`LiteRT.js ${version}: ${files.length} files into ${vendor}`);
