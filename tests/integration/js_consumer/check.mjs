// Imports the installed @fanout/client the way node resolves it for an application (the
// package's "exports"), and checks what each entry point exports. Exits non-zero on a miss.
import assert from "node:assert/strict";

const root = await import("@fanout/client");
assert.equal(typeof root.FanoutClient, "function");
assert.equal(root.default, root.FanoutClient);
assert.equal(typeof root.shouldReconnect, "function");
assert.equal(root.shouldReconnect(3500), false);
assert.equal(root.shouldReconnect(1006), true);
assert.equal(typeof root.advisedDelay, "function");

const react = await import("@fanout/client/react");
for (const name of ["makeHooks", "makeUseChannel", "makeUseConnectionState"]) {
  assert.equal(typeof react[name], "function", name);
}
assert.equal(react.default, react.makeHooks);

const zustand = await import("@fanout/client/zustand");
assert.equal(typeof zustand.bindChannel, "function");
assert.equal(zustand.default, zustand.bindChannel);

// A file outside "exports" is not reachable: the entry points are the package's API.
await assert.rejects(import("@fanout/client/src/fanout.js"), { code: "ERR_PACKAGE_PATH_NOT_EXPORTED" });

const client = new root.FanoutClient("ws://127.0.0.1:9/ws");
assert.deepEqual(client.urls, ["ws://127.0.0.1:9/ws"]);
assert.equal(client.state, "closed");
console.log(JSON.stringify({
  root: Object.keys(root).sort(),
  react: Object.keys(react).sort(),
  zustand: Object.keys(zustand).sort(),
}));
