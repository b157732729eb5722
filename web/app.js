// streamgate's chat page: streams /v1/chat/completions with fetch() and a stream reader, and
// shows each read as it arrives. No build step, no dependency; served as a file so the page
// works under a Content-Security-Policy without inline script.
"use strict";

const API_PATH = "/v1/chat/completions";
const KEY_STORAGE = "streamgate.clientKey";
// Messages sent back as history: the last few exchanges, so a long chat stays a small request.
const HISTORY_MESSAGES = 12;
// The strip's time axis spans at least this long, then stretches with the answer.
const STRIP_MIN_SPAN_MS = 2000;

// Server-sent events, as the WHATWG HTML parser reads them: lines end in CRLF, LF or CR (a CR at
// the end of a read may be the first half of a CRLF), "data:" lines join with "\n", lines
// starting with ":" are comments, an empty line ends an event. The decoder drops a leading BOM.
class EventStreamParser {
  constructor() {
    this.decoder = new TextDecoder("utf-8");
    this.pending = "";
    this.data = [];
    this.eventType = "";
  }

  // Returns the events completed by this read: [{type, data}].
  feed(bytes) {
    this.pending += this.decoder.decode(bytes, { stream: true });
    const events = [];
    for (;;) {
      const end = this.pending.search(/\r\n|\r|\n/);
      if (end < 0) break;
      // A lone CR at the very end: wait for the next read to see whether an LF follows.
      if (this.pending[end] === "\r" && end === this.pending.length - 1) break;
      const width = this.pending.startsWith("\r\n", end) ? 2 : 1;
      const line = this.pending.slice(0, end);
      this.pending = this.pending.slice(end + width);
      this.line(line, events);
    }
    return events;
  }

  line(line, events) {
    if (line === "") {
      if (this.data.length > 0) {
        events.push({ type: this.eventType || "message", data: this.data.join("\n") });
      }
      this.data = [];
      this.eventType = "";
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.eventType = value;
  }
}

// What the gateway answered, in the client's terms: never shown as model text.
class GatewayError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status;
  }
}

async function errorFromResponse(response) {
  let detail = "";
  try {
    const body = await response.json();
    detail = (body && body.error && body.error.message) || "";
  } catch {
    // Not JSON (a proxy's own page): the status says enough.
  }
  const retry = response.headers.get("Retry-After");
  const texts = {
    401: "This gateway needs a valid client key: enter it under Connection.",
    429: `Too many requests${retry ? `: try again in ${retry} s` : ""}.`,
  };
  const summary = texts[response.status] || `The gateway answered ${response.status}.`;
  return new GatewayError(detail ? `${summary} (${detail})` : summary, response.status);
}

const $ = (id) => document.getElementById(id);

class ChatPage {
  constructor() {
    this.messages = [];
    this.controller = null;
    this.form = $("ask");
    this.prompt = $("prompt");
    this.key = $("key");
    this.model = $("model");
    this.send = $("send");
    this.stop = $("stop");
    this.log = $("log");
    this.error = $("error");
    this.strip = $("strip");
    this.key.value = sessionStorage.getItem(KEY_STORAGE) || "";
    this.key.addEventListener("change", () => this.keepKey());
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.ask();
    });
    this.prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.form.requestSubmit();
      }
    });
    this.stop.addEventListener("click", () => this.controller && this.controller.abort());
    $("clear").addEventListener("click", () => this.clear());
  }

  keepKey() {
    const key = this.key.value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  }

  clear() {
    if (this.controller) this.controller.abort();
    this.messages = [];
    this.log.replaceChildren();
    this.showError("");
    this.prompt.focus();
  }

  showError(text) {
    this.error.textContent = text;
    this.error.hidden = !text;
  }

  addEntry(role, text) {
    const item = document.createElement("li");
    item.className = role;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Answer";
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    item.append(who, body);
    this.log.append(item);
    return body;
  }

  async ask() {
    const text = this.prompt.value.trim();
    if (!text || this.controller) return;
    this.keepKey();
    this.showError("");
    this.messages.push({ role: "user", content: text });
    this.addEntry("user", text);
    this.prompt.value = "";
    const answer = this.addEntry("assistant", "");
    answer.parentElement.setAttribute("aria-busy", "true");
    const measure = new Measure(this.strip);
    this.controller = new AbortController();
    this.send.disabled = true;
    this.stop.disabled = false;
    this.log.setAttribute("aria-busy", "true");
    let outcome = "";
    try {
      await this.stream(answer, measure, this.controller.signal);
    } catch (error) {
      if (error.name === "AbortError") outcome = "stopped";
      else {
        outcome = "failed";
        this.showError(
          error instanceof GatewayError ? error.message : `The stream failed: ${error.message}`,
        );
        if (error.status === 401) this.key.focus();
      }
    } finally {
      this.controller = null;
      this.send.disabled = false;
      this.stop.disabled = true;
      this.log.setAttribute("aria-busy", "false");
      answer.parentElement.setAttribute("aria-busy", "false");
      measure.finish();
    }
    if (outcome) answer.parentElement.dataset.outcome = outcome;
    if (answer.textContent) {
      this.messages.push({ role: "assistant", content: answer.textContent });
    } else {
      answer.parentElement.remove();
      this.messages.pop(); // a question without an answer is not history
    }
    if (document.activeElement === document.body || document.activeElement === this.stop) {
      this.prompt.focus();
    }
  }

  async stream(answer, measure, signal) {
    const headers = { "Content-Type": "application/json" };
    const key = this.key.value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    const body = {
      messages: this.messages.slice(-HISTORY_MESSAGES),
      stream: true,
      stream_options: { include_usage: true },
    };
    const model = this.model.value.trim();
    if (model) body.model = model;
    measure.start();
    const response = await fetch(API_PATH, {
      method: "POST",
      headers,
      body: JSON.stringify(body),
      signal,
      cache: "no-store",
    });
    $("request-id").textContent = response.headers.get("X-Request-ID") || "–";
    if (!response.ok) throw await errorFromResponse(response);
    const reader = response.body.getReader();
    const parser = new EventStreamParser();
    let done = false;
    while (!done) {
      const read = await reader.read();
      if (read.done) break;
      measure.read();
      let text = "";
      for (const event of parser.feed(read.value)) {
        if (event.data === "[DONE]") {
          done = true;
          break;
        }
        const chunk = JSON.parse(event.data);
        if (chunk.error) {
          // In-band: the status was already 200. Keep what arrived, say what failed.
          if (text) answer.append(text);
          throw new GatewayError(`The answer broke off: ${chunk.error.message || "an error"}.`);
        }
        if (chunk.usage) measure.tokens = chunk.usage.completion_tokens;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          text += delta.content;
          measure.contents += 1;
        }
      }
      // One DOM update per read: what the reader gave at once is shown at once.
      if (text) {
        answer.append(text);
        measure.content();
      }
    }
    if (!done) throw new GatewayError("The answer ended before it was complete.");
  }
}

// Time to first token, tokens per second and the strip of reads of one answer.
class Measure {
  constructor(strip) {
    this.strip = strip;
    this.strip.replaceChildren();
    this.startedAt = 0;
    this.firstAt = 0;
    this.lastAt = 0;
    this.contents = 0;
    this.tokens = 0;
    this.reads = [];
    for (const id of ["ttft", "rate", "reads", "request-id"]) $(id).textContent = "–";
  }

  start() {
    this.startedAt = performance.now();
  }

  read() {
    const at = performance.now() - this.startedAt;
    this.reads.push(at);
    const mark = document.createElement("span");
    mark.className = "mark";
    this.strip.append(mark);
    this.place();
    $("reads").textContent = String(this.reads.length);
  }

  // A read that brought text (its deltas already counted in this.contents).
  content() {
    const now = performance.now();
    if (!this.firstAt) {
      this.firstAt = now;
      $("ttft").textContent = `${Math.round(now - this.startedAt)} ms`;
    }
    this.lastAt = now;
    const tokens = this.contents - 1;
    const seconds = (this.lastAt - this.firstAt) / 1000;
    if (tokens > 0 && seconds > 0) $("rate").textContent = (tokens / seconds).toFixed(1);
  }

  place() {
    const span = Math.max(STRIP_MIN_SPAN_MS, this.reads[this.reads.length - 1] || 0);
    const marks = this.strip.children;
    for (let i = 0; i < marks.length; i += 1) {
      marks[i].style.left = `${(100 * this.reads[i]) / span}%`;
    }
  }

  finish() {
    // Tokens per second from the upstream's own count when it sent one (a delta may hold more
    // than one token), over the time from the first token to the last.
    const tokens = (this.tokens || this.contents) - 1;
    const seconds = (this.lastAt - this.firstAt) / 1000;
    if (tokens > 0 && seconds > 0) $("rate").textContent = (tokens / seconds).toFixed(1);
    else if (tokens > 0) $("rate").textContent = "all in one read";
    const last = this.reads.length ? Math.round(this.reads[this.reads.length - 1]) : 0;
    this.strip.setAttribute(
      "aria-label",
      `Arrivals of the last answer: ${this.reads.length} reads over ${last} ms`,
    );
  }
}

document.addEventListener("DOMContentLoaded", () => {
  window.streamgateChat = new ChatPage();
});
