// The service worker: every file of the app (listed with its sha256 in files.json) is cached on
// install, and served from the cache first, so the page works with no network at all once loaded.
// A new build (another files.json version) gets a cache of its own; the old one is dropped.
const SCOPE = new URL("./", self.location).href;

async function listing() {
  const r = await fetch(new URL("files.json", SCOPE), { cache: "no-store" });
  return r.json();
}

self.addEventListener("install", (event) => {
  event.waitUntil((async () => {
    const { version, files } = await listing();
    const cache = await caches.open(`edgetl-${version}`);
    await cache.addAll(["./", "files.json", ...Object.keys(files)].map((f) => new URL(f, SCOPE).href));
    await self.skipWaiting();
  })());
});

self.addEventListener("activate", (event) => {
  event.waitUntil((async () => {
    const { version } = await listing().catch(() => ({ version: null }));
    if (version) for (const key of await caches.keys()) if (key.startsWith("edgetl-") && key !== `edgetl-${version}`) await caches.delete(key);
    await self.clients.claim();
  })());
});

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || !url.href.startsWith(SCOPE)) return; // the API (sync) goes to the network
  event.respondWith((async () => {
    const hit = await caches.match(event.request, { ignoreSearch: true });
    return hit || fetch(event.request);
  })());
});
