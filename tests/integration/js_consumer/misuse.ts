// Wrong uses the package's types must reject (tests/integration/test_js_package.py expects
// exactly these errors): proof that tsc reads the package's declarations, not `any`.
import { FanoutClient } from "@fanout/client";
import { makeHooks } from "@fanout/client/react";
import { bindChannel } from "@fanout/client/zustand";

const client = new FanoutClient("ws://127.0.0.1:8000/ws");
// @ts-expect-error maxRate is a number
client.subscribe("quotes.MNQ", { maxRate: "fast" });
// @ts-expect-error a store needs getState and setState
bindChannel({ getState: () => ({}) }, client, "depth.MNQ");
// @ts-expect-error React needs useEffect, useRef and useState
makeHooks({ useState: () => [0, () => undefined] });
// @ts-expect-error history's range is numbers
void client.history("trades.MNQ", "1", "2");
// Not an error: the line below must fail the check with TS2551 (no such method; "did you mean subscribe").
client.subscribeAll();
