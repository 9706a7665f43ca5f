// A minimal relay in Node.js (`ws` + node-redis): the fastest floor bench/perframe.py
// compares the edge with, beside bench/relay.py (Python `websockets`). It does what
// relay.py does and nothing more: `connect` gets `connected`, `subscribe` gets `subscribed`
// with the channel's current offset (its meta hash's `top`), and each live message goes out
// to the channel's clients as one frame, in the bytes the edge writes (common.protocol's
// pub_json). No ordering checks, recovery, queues, pings, metrics or authentication.
//
//   node bench/noderelay/relay.mjs --port P --redis-url URL --key-prefix PREFIX
import { createClient } from "redis";
import { WebSocketServer } from "ws";

function arg(name) {
  const i = process.argv.indexOf(name);
  if (i < 0 || i + 1 >= process.argv.length) {
    console.error(`relay.mjs: ${name} is required`);
    process.exit(2);
  }
  return process.argv[i + 1];
}

const host = process.argv.includes("--host") ? arg("--host") : "127.0.0.1";
const port = Number(arg("--port"));
const url = arg("--redis-url");
const prefix = arg("--key-prefix");

const redis = createClient({ url });
const sub = redis.duplicate();
await redis.connect();
await sub.connect();

const clients = new Map(); // channel -> Set<WebSocket>

// The live messages of one pub/sub message (common/broker/live.py's format).
function decodeLive(payload) {
  if (payload[0] !== "\x1e") {
    const parts = splitN(payload, "\n", 6);
    return [{ offset: Number(parts[1]), deleted: parts[2] === "1", key: parts[3], data: parts[5] }];
  }
  const records = payload.split("\x1e");
  let offset = Number(records[1].split("\n")[1]);
  const out = [];
  for (let i = 2; i < records.length; i++) {
    const [deleted, key, , data] = splitN(records[i], "\n", 4);
    out.push({ offset: offset++, deleted: deleted === "1", key, data });
  }
  return out;
}

// `s` split at the first n - 1 separators (the rest, data, may hold the separator).
function splitN(s, sep, n) {
  const out = [];
  let from = 0;
  for (let i = 0; i < n - 1; i++) {
    const at = s.indexOf(sep, from);
    out.push(s.slice(from, at));
    from = at + 1;
  }
  out.push(s.slice(from));
  return out;
}

function pubJson(channel, p) {
  let head = `{"type":"pub","channel":"${channel}","offset":${p.offset}`;
  if (p.key) head += `,"key":${JSON.stringify(p.key)}`;
  if (p.deleted) head += ',"deleted":true';
  return `${head},"data":${p.data}}`;
}

function forward(channel, payload) {
  const subs = clients.get(channel);
  if (!subs || subs.size === 0) return;
  for (const p of decodeLive(payload)) {
    const frame = pubJson(channel, p);
    for (const ws of subs) ws.send(frame);
  }
}

const wss = new WebSocketServer({
  host, port, perMessageDeflate: false,
  handleProtocols: (protocols) => (protocols.has("fanout.json") ? "fanout.json" : false),
});
wss.on("connection", (ws) => {
  const mine = [];
  ws.on("message", async (raw) => {
    let msg;
    try { msg = JSON.parse(raw.toString()); } catch { ws.close(1007); return; }
    if (msg.type === "connect") {
      ws.send(JSON.stringify({ type: "connected", id: msg.id, client: "noderelay" }));
    } else if (msg.type === "subscribe") {
      const channel = String(msg.channel);
      let subs = clients.get(channel);
      if (!subs) {
        subs = new Set();
        clients.set(channel, subs);
        await sub.subscribe(`${prefix}:live:{${channel}}`, (payload) => forward(channel, payload));
      }
      subs.add(ws);
      mine.push(channel);
      const top = await redis.hGet(`${prefix}:{${channel}}:meta`, "top");
      ws.send(JSON.stringify({ type: "subscribed", id: msg.id, channel,
        offset: Number(top || 0), recovered: false }));
    }
  });
  ws.on("close", () => { for (const c of mine) clients.get(c)?.delete(ws); });
});
wss.on("listening", () => console.log(`noderelay listening on ${host}:${port}`));

for (const sig of ["SIGTERM", "SIGINT"]) {
  process.on(sig, async () => {
    wss.close();
    await Promise.allSettled([sub.quit(), redis.quit()]);
    process.exit(0);
  });
}
