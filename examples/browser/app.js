// Streams a chat completion from metergate and shows the wallet balance.
// No build step, no dependencies: fetch() + a stream reader parse the SSE.
"use strict";

const $ = (id) => document.getElementById(id);

// What happened, for people (the page) and for tests (window.metergateDemo).
const demo = (window.metergateDemo = {
  chunks: [],        // {t: ms since the request, text: the delta} per content chunk, in order
  done: false,       // the stream ended ([DONE] or closed)
  error: null,       // a message when a call failed (or the browser refused to read it)
  requestId: null,   // X-Request-Id of the completion
  balance: null,     // last balance read from /v1/wallet (decimal string)
  balanceReads: 0,
  balances: [],     // every balance read, in order
});

function settings() {
  return {
    base: $("base").value.replace(/\/+$/, ""),
    key: $("key").value.trim(),
    model: $("model").value.trim(),
    prompt: $("prompt").value,
  };
}

function headers(key) {
  return { Authorization: `Bearer ${key}`, "Content-Type": "application/json" };
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    return `${resp.status}: ${body.error.message}`;
  } catch {
    return `HTTP ${resp.status}`;
  }
}

async function refreshBalance() {
  const { base, key } = settings();
  if (!key) return;
  try {
    const resp = await fetch(`${base}/wallet`, { headers: headers(key) });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const wallet = await resp.json();
    demo.balance = wallet.balance;
    demo.balanceReads += 1;
    demo.balances.push(wallet.balance);
    $("balance").textContent = wallet.balance;
  } catch (err) {
    $("balance").textContent = "unavailable";
    demo.balanceError = String(err.message || err);
  }
}

// Split an SSE byte stream into events and hand each `data:` payload to onData.
async function readEvents(body, onData) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data:")) {
          if (onData(line.slice(5).trim()) === false) return;
        }
      }
    }
  }
}

async function send() {
  const { base, key, model, prompt } = settings();
  const output = $("output");
  output.textContent = "";
  output.classList.remove("error");
  Object.assign(demo, { chunks: [], done: false, error: null, requestId: null });
  $("status").textContent = "streaming…";
  $("send").disabled = true;
  const started = performance.now();
  try {
    const resp = await fetch(`${base}/chat/completions`, {
      method: "POST",
      headers: headers(key),
      body: JSON.stringify({ model, stream: true, max_tokens: 200, messages: [{ role: "user", content: prompt }] }),
    });
    demo.requestId = resp.headers.get("X-Request-Id");
    if (!resp.ok) throw new Error(await errorMessage(resp));
    await readEvents(resp.body, (data) => {
      if (data === "[DONE]") return false;
      const chunk = JSON.parse(data);
      const text = chunk.choices?.[0]?.delta?.content;
      if (text) {
        demo.chunks.push({ t: performance.now() - started, text });
        output.textContent += text;
      }
    });
    $("status").textContent = `done (${demo.requestId})`;
  } catch (err) {
    // A refused origin shows up here as a TypeError: the browser read nothing.
    demo.error = String(err.message || err);
    output.classList.add("error");
    output.textContent = demo.error;
    $("status").textContent = "failed";
  } finally {
    demo.done = true;
    $("send").disabled = false;
    await refreshBalance();  // the charge has settled by the time the stream ends
  }
}

$("key").addEventListener("change", refreshBalance);
$("base").addEventListener("change", refreshBalance);
$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});

// Settings from the URL fragment (kept out of server logs), then the balance.
const fragment = new URLSearchParams(location.hash.slice(1));
for (const name of ["base", "key", "model", "prompt"]) {
  if (fragment.has(name)) $(name).value = fragment.get(name);
}
refreshBalance().then(() => {
  if (fragment.get("autostart") === "1") send();
});
