// The chat page: conversations kept in this browser (localStorage), answers streamed from
// POST v1/chat/completions and rendered as sanitized Markdown, each with the sources it rests on and a mark
// when they do not support it. User text, and the documents' snippets, are only ever set as text.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "cag-conversations", CURRENT = "cag-current", KEY = "cag-key", MAX_TOKENS = "cag-max-tokens", KB = "cag-kb";
const KEEP = 100;  // conversations kept; the oldest go first
const NARROW = window.matchMedia("(max-width: 760px)");  // as chat.css: the list is a drawer below this width

// -- rendering -------------------------------------------------------------------------------------

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {  // links in answers open elsewhere and tell the target nothing
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

/** Markdown -> sanitized HTML: the one path every answer takes, streamed or restored. */
function renderMarkdown(text) {
  const html = marked.parse(String(text), { gfm: true, breaks: true, async: false });
  return DOMPurify.sanitize(html, {
    FORBID_TAGS: ["style", "img", "form", "input", "button", "textarea", "select", "iframe"],
    FORBID_ATTR: ["style"],
  });
}

/** What the picker says about one /v1/models row: name, tokens and the model it was built with.
 *  The model may come as `model_name`, `cag.model` or `root`; tokens as `tokens` or `cag.tokens`. */
function modelLabel(row) {
  const cag = row.cag && typeof row.cag === "object" ? row.cag : {};
  const number = (...xs) => xs.find((x) => Number.isFinite(x)) ?? null;
  const tokens = number(row.tokens, cag.tokens), documents = number(row.documents, cag.documents);
  const model = [row.model_name, cag.model, row.root].find((x) => typeof x === "string" && x) || null;
  const tokensText = tokens !== null ? `${tokens.toLocaleString("en")} tokens` : "";
  const documentsText = documents !== null ? `${documents} document${documents === 1 ? "" : "s"}` : "";
  return { name: row.id, tokens, model, documents: documentsText,
           details: [tokensText, documentsText, model].filter(Boolean).join(" · "),
           text: [row.id, tokensText, model].filter(Boolean).join(" · ") };
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

// -- state -----------------------------------------------------------------------------------------

function newId() {
  return crypto.randomUUID ? crypto.randomUUID() : Date.now().toString(36) + Math.random().toString(36).slice(2);
}

function loadConversations() {
  try {
    const list = JSON.parse(localStorage.getItem(STORE) || "[]");
    return Array.isArray(list) ? list.filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages)) : [];
  } catch {
    return [];  // a damaged store starts afresh rather than breaking the page
  }
}

function save() {
  const keep = conversations.filter((c) => c.messages.length).slice(0, KEEP);
  for (let n = keep.length; ; n = Math.floor(n / 2)) {  // over quota: keep fewer, newest first
    try {
      localStorage.setItem(STORE, JSON.stringify(keep.slice(0, n)));
      break;
    } catch {
      if (n === 0) break;  // storage refused altogether: the page still works, it just forgets
    }
  }
  try { localStorage.setItem(CURRENT, current.id); } catch { /* private mode: the page still works */ }
}

let conversations = loadConversations();
let current = conversations.find((c) => c.id === localStorage.getItem(CURRENT)) || blank();
let models = [];
let controller = null;  // the AbortController of the answer being streamed, if any

function blank(kb) {
  return { id: newId(), title: "", kb: kb || "", updated: Date.now(), messages: [] };
}

// -- conversation list -----------------------------------------------------------------------------

function ago(ms) {
  const s = (Date.now() - ms) / 1000;
  if (s < 60) return "just now";
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(ms).toLocaleDateString();
}

function renderList() {
  const items = conversations.filter((c) => c.messages.length).map((c) => {
    const li = el("li", "conv" + (c.id === current.id ? " active" : ""));
    li.dataset.id = c.id;
    const open = el("button", "conv-open");
    open.type = "button";
    open.append(el("span", "conv-title", c.title || "(untitled)"), el("span", "conv-meta", `${c.kb} · ${ago(c.updated)}`));
    open.addEventListener("click", () => { if (!controller) { select(c); closeNav(); } });
    const del = el("button", "conv-delete", "×");
    del.type = "button";
    del.title = "Delete this conversation";
    del.setAttribute("aria-label", `Delete conversation “${c.title}”`);
    del.addEventListener("click", () => remove(c));
    li.append(open, del);
    return li;
  });
  if (!items.length) items.push(el("li", "conv-none", "Your conversations appear here."));
  $("conversations").replaceChildren(...items);
}

function select(conversation) {
  current = conversation;
  if (current.kb && models.some((m) => m.id === current.kb)) $("kb").value = current.kb;
  save();
  renderThread();
  renderList();
  showKb();
}

function startNew() {
  if (controller) return;
  current = blank($("kb").value);
  save();
  renderThread();
  renderList();
  closeNav();
  $("question").focus();
}

function remove(conversation) {
  if (controller && conversation === current) return;
  conversations = conversations.filter((c) => c !== conversation);
  if (conversation === current) current = blank($("kb").value);
  save();
  renderThread();
  renderList();
}

// -- thread ----------------------------------------------------------------------------------------

function userNode(text) {
  const row = el("div", "msg user");
  row.append(el("div", "bubble", text));  // textContent: a question is never HTML
  return row;
}

function assistantNode() {
  const row = el("div", "msg assistant");
  const body = el("div", "body md"), checks = el("div", "grounding"), stats = el("div", "stats");
  const content = el("div", "content");
  checks.hidden = true;
  content.append(body, checks, stats);
  row.append(el("span", "avatar", "c"), content);
  return { row, body, checks, stats };
}

const percent = (x) => `${Math.round(Math.min(Math.max(Number(x) || 0, 0), 1) * 100)}%`;

/** What an answer is checked with, from the response's `cag` object: kept with the conversation. */
function groundingOf(extra) {
  if (!extra || typeof extra !== "object" || !Array.isArray(extra.sources)) return undefined;
  return { sources: extra.sources, supported: extra.supported === true, support: Number(extra.support) || 0,
           generated: typeof extra.generated === "string" ? extra.generated : null };
}

/** One source: its document and where in it, opening to the passage itself (the user's text: never HTML). */
function sourceNode(source) {
  const item = el("li", "source"), details = el("details"), summary = el("summary");
  const score = el("span", "source-score", percent(source.score));
  score.title = "Share of the answer's facts this passage holds";
  summary.append(el("span", "source-doc", String(source.document ?? "")), " · ",
                 el("span", "source-loc", String(source.locator ?? "")), " · ", score);
  details.append(summary, el("blockquote", "source-snippet", String(source.snippet ?? "")));
  item.append(details);
  return item;
}

/** Under an answer: a mark when its sources do not support it (with the model's own text when it was
 *  refused), then its sources. Nothing at all for answers stored before sources existed. */
function renderGrounding(node, grounding) {
  const parts = [];
  if (grounding && !grounding.supported) {
    const badge = el("span", "badge unsupported", `not supported by the knowledge base · support ${percent(grounding.support)}`);
    badge.title = "Its sources hold too few of what the answer says: check it against them before relying on it";
    parts.push(badge);
  }
  if (grounding && grounding.generated) {
    const details = el("details", "generated");
    details.append(el("summary", "", "What the model answered"), el("div", "generated-text", grounding.generated));
    parts.push(details);
  }
  const sources = grounding && Array.isArray(grounding.sources) ? grounding.sources.filter((x) => x && typeof x === "object") : [];
  if (sources.length) {
    const list = el("ol", "sources");
    list.setAttribute("aria-label", "Sources");
    list.append(...sources.map(sourceNode));
    parts.push(el("div", "sources-title", "Sources"), list);
  }
  node.replaceChildren(...parts);
  node.hidden = !parts.length;
}

function fill(view, message) {
  view.row.classList.toggle("error", Boolean(message.error));
  if (message.error) view.body.textContent = message.error;
  else if (!message.content) {
    view.body.replaceChildren(el("em", "muted", message.stopped ? "Stopped before the answer began." : "No answer."));
  }
  else view.body.innerHTML = renderMarkdown(message.content);
  renderGrounding(view.checks, message.error ? undefined : message.grounding);
  view.stats.textContent = message.stats || "";
  view.stats.title = message.statsTitle || "";
  view.stats.dataset.cached = message.cached ?? "";
}

function renderThread() {
  const nodes = [];
  for (const m of current.messages) {
    if (m.role === "user") nodes.push(userNode(m.content));
    else {
      const view = assistantNode();
      fill(view, m);
      nodes.push(view.row);
    }
  }
  $("log").replaceChildren(...nodes);
  $("empty").hidden = nodes.length > 0;
  scrollDown(true);
}

function nearBottom() {
  const t = $("thread");
  return t.scrollHeight - t.scrollTop - t.clientHeight < 80;
}

function scrollDown(force) {
  const t = $("thread");
  if (force || nearBottom()) t.scrollTop = t.scrollHeight;
}

// -- knowledge bases -------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function notice(text, kind = "") {
  $("notice").textContent = text || "";
  $("notice").dataset.kind = kind;
  $("notice").hidden = !text;
}

/** The knowledge bases into the picker; false when the server could not list them. */
async function loadModels() {
  notice("");
  let body, r;
  try {
    r = await fetch("v1/models", { headers: headers() });
    body = await r.json();
  } catch (err) {
    notice(`Could not reach the server: ${err.message}`);
    return false;
  }
  if (!r.ok) {
    notice(body.error ? body.error.message : r.statusText);
    if (r.status === 401) askForKey();
    return false;
  }
  models = Array.isArray(body.data) ? body.data : [];
  const options = models.map((m) => {
    const label = modelLabel(m);
    const option = new Option(label.text, m.id);
    option.dataset.tokens = label.tokens ?? "";
    option.dataset.model = label.model ?? "";
    return option;
  });
  $("kb").replaceChildren(...options);
  if (!models.length) notice("No knowledge bases yet: build one with `cag build` or POST /v1/kbs, then reload.");
  const wanted = current.kb && models.some((m) => m.id === current.kb) ? current.kb : localStorage.getItem(KB);
  if (wanted && models.some((m) => m.id === wanted)) $("kb").value = wanted;
  if (!current.messages.length) current.kb = $("kb").value;
  showKb();
  return true;
}

/** The server wants a key: show the field for it (on a narrow screen the list and settings are a drawer). */
function askForKey() {
  $("settings").open = true;
  if (NARROW.matches) openNav();
  else $("key").focus();
}

function showKb() {
  const row = models.find((m) => m.id === $("kb").value);
  const gone = current.messages.length && current.kb && !models.some((m) => m.id === current.kb);
  if (gone) notice(`This conversation's knowledge base “${current.kb}” is not on the server; a new question starts a new conversation.`, "gone");
  else if ($("notice").dataset.kind === "gone") notice("");
  $("kb-info").textContent = row ? modelLabel(row).documents : "";  // the rest is in the picker's own text
  $("kb").title = row ? `${row.id} · ${modelLabel(row).details}` : "";
  $("empty-kb").textContent = row ? row.id : "your knowledge base";
}

$("kb").addEventListener("change", () => {
  try { localStorage.setItem(KB, $("kb").value); } catch { /* not kept, still used */ }
  if (current.messages.length) startNew();  // earlier turns belong to the other knowledge base
  else current.kb = $("kb").value;
  showKb();
});

// -- asking ----------------------------------------------------------------------------------------

/** Earlier turns as OpenAI messages (turns that failed are left out). */
function history() {
  const out = [];
  const m = current.messages;
  for (let i = 0; i + 1 < m.length; i += 2) {
    if (m[i].role === "user" && m[i + 1].role === "assistant" && !m[i + 1].error && m[i + 1].content) {
      out.push({ role: "user", content: m[i].content }, { role: "assistant", content: m[i + 1].content });
    }
  }
  return out;
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("app").classList.toggle("streaming", on);
}

/** One short line under an answer; the full numbers are in its tooltip. */
function statsLine(firstToken, usage, extra, stopped) {
  const n = (x) => x.toLocaleString("en");
  const short = [], full = [];
  if (stopped) short.push("stopped");
  if (extra && extra.response_cache) short.push(`response cache: ${extra.response_cache}`);
  if (firstToken !== null) short.push(`TTFT ${Math.round(firstToken)} ms`);
  if (extra && extra.ttft_s != null) full.push(`server TTFT ${Math.round(extra.ttft_s * 1000)} ms`);
  if (extra && extra.total_s != null) full.push(`server total ${extra.total_s.toFixed(2)} s`);
  if (usage) {
    const cached = usage.prompt_tokens_details.cached_tokens;
    short.push(`${n(cached)} of ${n(usage.prompt_tokens)} prompt tokens cached`, `${n(usage.completion_tokens)} generated`);
  }
  return { text: short.join(" · "), title: [...short, ...full].join(" · ") };
}

async function ask(question) {
  const kb = $("kb").value;
  if (!kb) { notice("Pick a knowledge base first."); return; }
  if (current.messages.length && current.kb !== kb) {  // its history belongs to a knowledge base that is gone
    current = blank(kb);
    renderThread();
    notice("");
  }
  const messages = [...history(), { role: "user", content: question }];
  if (!current.messages.length) {
    current.kb = kb;
    current.title = question.replace(/\s+/g, " ").slice(0, 80);
  }
  const answer = { role: "assistant", content: "" };
  current.messages.push({ role: "user", content: question }, answer);
  current.updated = Date.now();
  conversations = [current, ...conversations.filter((c) => c !== current)];
  save();
  renderList();

  $("empty").hidden = true;
  $("log").append(userNode(question));
  const view = assistantNode();
  view.body.append(typing());
  $("log").append(view.row);
  scrollDown(true);

  controller = new AbortController();
  busy(true);
  const start = performance.now();
  let firstToken = null, usage = null, extra = null, stopped = false, pending = false;
  const paint = () => {  // at most once a frame, however fast tokens come
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; fill(view, answer); scrollDown(false); });
  };
  const maxTokens = parseInt($("max-tokens").value, 10);
  try {
    const r = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ model: kb, stream: true, stream_options: { include_usage: true }, messages,
                             ...(maxTokens > 0 ? { max_tokens: maxTokens } : {}) }),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      answer.error = body.error ? body.error.message : `${r.status} ${r.statusText}`;
    } else {
      const reader = r.body.getReader(), decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const line = buffer.slice(0, cut).trim();
          buffer = buffer.slice(cut + 2);
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const event = JSON.parse(line.slice(6));
          if (event.error) { answer.error = event.error.message; continue; }
          if (event.usage) usage = event.usage;
          if (event.cag) { extra = event.cag; answer.grounding = groundingOf(extra); }  // the last chunk's
          const text = event.choices && event.choices[0] && event.choices[0].delta.content;
          if (text) {
            if (firstToken === null) firstToken = performance.now() - start;
            answer.content += text;
            paint();
          }
        }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") stopped = true;
    else answer.error = `The answer was cut off: ${err.message}`;
  } finally {
    controller = null;
    const line = statsLine(firstToken, usage, extra, stopped);
    answer.stats = line.text;
    answer.statsTitle = line.title;
    answer.cached = usage ? usage.prompt_tokens_details.cached_tokens : undefined;
    if (stopped) answer.stopped = true;
    current.updated = Date.now();
    save();
    fill(view, answer);
    busy(false);
    renderList();
    scrollDown(false);
  }
}

function typing() {
  const dots = el("span", "typing");
  dots.setAttribute("aria-label", "waiting for the first token");
  dots.append(el("i"), el("i"), el("i"));
  return dots;
}

function stop() {
  if (controller) controller.abort();  // the server sees the connection close and stops decoding
}

function submit() {
  const q = $("question").value.trim();
  if (!q || controller) return;
  $("question").value = "";
  grow();
  ask(q);
}

function grow() {
  const q = $("question");
  q.style.height = "auto";
  q.style.height = Math.min(q.scrollHeight, 200) + "px";
}

// -- narrow screens: the conversation list slides over the thread ----------------------------------

function openNav() {
  $("app").classList.add("nav-open");
  $("scrim").hidden = false;
  $("menu").setAttribute("aria-expanded", "true");
}

function closeNav() {
  $("app").classList.remove("nav-open");
  $("scrim").hidden = true;
  $("menu").setAttribute("aria-expanded", "false");
}

// -- wiring ----------------------------------------------------------------------------------------

$("ask").addEventListener("submit", (e) => { e.preventDefault(); submit(); });
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit(); }
});
$("question").addEventListener("input", grow);
document.addEventListener("keydown", (e) => { if (e.key === "Escape") { if (controller) stop(); else closeNav(); } });
$("stop").addEventListener("click", stop);
$("new").addEventListener("click", startNew);
$("new-top").addEventListener("click", startNew);
$("reload").addEventListener("click", loadModels);
$("menu").addEventListener("click", () => ($("app").classList.contains("nav-open") ? closeNav() : openNav()));
$("scrim").addEventListener("click", closeNav);
$("key").value = localStorage.getItem(KEY) || "";
$("key").addEventListener("change", async () => {
  localStorage.setItem(KEY, $("key").value.trim());
  if (await loadModels()) closeNav();  // the drawer opened for the key has done its job
});
NARROW.addEventListener("change", (e) => { if (!e.matches) closeNav(); });  // wide: no drawer to leave open
$("max-tokens").value = localStorage.getItem(MAX_TOKENS) || "";
$("max-tokens").addEventListener("change", () => localStorage.setItem(MAX_TOKENS, $("max-tokens").value));

window.cagChat = { renderMarkdown, modelLabel };  // the page's own render path, for tests and the curious
renderThread();
renderList();
loadModels();
