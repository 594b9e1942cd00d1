/* The chat page: streams answers from POST /v1/chat/completions (SSE over fetch), one
   conversation per pane (two when comparing), feedback through POST /v1/feedback.
   States per turn: in flight, streamed response with metadata, retryable error (Retry),
   rate limited (wait, then Retry), authentication required (sign in). */
(function () {
  "use strict";
  var form = document.getElementById("chat-form");
  if (!form) return;
  var api = form.dataset.api;
  var csrf = form.querySelector("[name=csrfmiddlewaretoken]").value;
  var compare = document.getElementById("compare-toggle");
  var panes = document.getElementById("panes");
  var template = document.getElementById("turn-template");
  var history = { a: [], b: [] };

  function headers() {
    return { "Content-Type": "application/json", "X-CSRFToken": csrf, "Accept": "text/event-stream" };
  }

  function setCompare() {
    var on = compare.checked;
    document.getElementById("model-b-field").hidden = !on;
    document.getElementById("pane-b").hidden = !on;
    panes.classList.toggle("is-compare", on);
  }
  compare.addEventListener("change", setCompare);

  document.getElementById("clear").addEventListener("click", function () {
    ["a", "b"].forEach(function (p) {
      history[p] = [];
      var t = document.querySelector("#pane-" + p + " .transcript");
      t.innerHTML = '<div class="empty chat-empty"><p class="empty-text">No messages yet. Type a question and press Send.</p></div>';
    });
  });

  function number(name) {
    var v = form.elements[name].value;
    return v === "" ? undefined : Number(v);
  }

  function body(model, messages) {
    var b = {
      model: model, messages: messages, stream: true,
      stream_options: { include_usage: true }, profile: form.elements.profile.value,
      seed: number("seed") || 0,
    };
    var max = number("max_tokens"), temp = number("temperature");
    if (max !== undefined) b.max_tokens = max;
    if (temp !== undefined) b.temperature = temp;
    return b;
  }

  function meta(turn, m) {
    var el = turn.querySelector(".turn-meta");
    var parts = [
      ["Latency", Math.round(m.latency_ms) + " ms"],
      ["Tokens", m.prompt_tokens + " in · " + m.completion_tokens + " out · " + (m.prompt_tokens + m.completion_tokens) + " total"],
      ["Cost", "$" + Number(m.cost).toFixed(6)],
      ["Cache", m.cached ? "hit" : "miss"],
      ["Profile", m.profile || "none"],
      ["Request", m.request_id],
    ];
    el.innerHTML = "";
    parts.forEach(function (p) {
      var span = document.createElement("span");
      span.dataset.field = p[0].toLowerCase();
      span.innerHTML = p[0] + " <b></b>";
      span.querySelector("b").textContent = p[1];
      el.appendChild(span);
    });
    el.hidden = false;
    var flags = turn.querySelector(".turn-flags");
    flags.innerHTML = "";
    (m.flags || []).forEach(function (f) {
      var b = document.createElement("span");
      b.className = "badge badge-warning";
      b.title = f.message;
      b.dataset.flag = f.code;
      b.textContent = f.code.replace("_", " ");
      flags.appendChild(b);
    });
    if (m.regenerated) {
      var r = document.createElement("span");
      r.className = "badge badge-info";
      r.textContent = "regenerated once";
      flags.appendChild(r);
    }
    flags.hidden = !flags.children.length;
  }

  function showError(turn, message, retryIn, retry) {
    turn.classList.remove("is-streaming");
    var box = turn.querySelector(".turn-error");
    var text = box.querySelector(".error-text");
    var button = box.querySelector(".retry");
    box.hidden = false;
    turn.querySelector(".turn-state").textContent = "";
    button.onclick = function () { box.hidden = true; retry(); };
    if (retryIn) {
      button.disabled = true;
      var left = retryIn;
      var tick = function () {
        text.textContent = message + " Retry in " + left + " s.";
        if (left-- <= 0) { button.disabled = false; text.textContent = message + " You can retry now."; return; }
        setTimeout(tick, 1000);
      };
      tick();
    } else {
      button.disabled = false;
      text.textContent = message;
    }
  }

  function authRequired(turn) {
    turn.classList.remove("is-streaming");
    var box = turn.querySelector(".turn-error");
    box.hidden = false;
    box.querySelector(".retry").hidden = true;
    box.querySelector(".error-text").innerHTML = 'Your session has ended: <a href="' + form.dataset.login + '">sign in again</a> to keep chatting.';
    turn.querySelector(".turn-state").textContent = "";
  }

  async function run(pane, model, turn, messages) {
    var text = turn.querySelector(".turn-text");
    var state = turn.querySelector(".turn-state");
    text.textContent = "";
    turn.classList.add("is-streaming");
    turn.dataset.state = "in-flight";
    state.textContent = "Generating with " + model + "…";
    var retry = function () { run(pane, model, turn, messages); };
    var response;
    try {
      response = await fetch(api + "chat/completions", {
        method: "POST", headers: headers(), credentials: "same-origin", body: JSON.stringify(body(model, messages)),
      });
    } catch (e) {
      turn.dataset.state = "error";
      return showError(turn, "The server could not be reached.", 0, retry);
    }
    if (response.status === 401) { turn.dataset.state = "auth"; return authRequired(turn); }
    if (!response.ok) {
      var error = {};
      try { error = (await response.json()).error || {}; } catch (e) { /* not JSON */ }
      if (response.status === 429) {
        turn.dataset.state = "rate-limited";
        var wait = parseInt(response.headers.get("Retry-After") || "5", 10);
        return showError(turn, "Rate limited: too many requests.", wait, retry);
      }
      turn.dataset.state = "error";
      var transient = response.status >= 500;
      return showError(turn, (error.message || ("HTTP " + response.status)) + (transient ? "" : ""), 0, retry);
    }
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var buffer = "", answer = "", info = null, usage = null, failure = null;
    for (;;) {
      var chunk;
      try {
        chunk = await reader.read();
      } catch (e) {
        failure = { message: "The connection broke off mid-answer." };
        break;
      }
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true });
      var events = buffer.split("\n\n");
      buffer = events.pop();
      events.forEach(function (event) {
        var line = event.trim();
        if (!line.startsWith("data:")) return;
        var data = line.slice(5).trim();
        if (data === "[DONE]") return;
        var payload = JSON.parse(data);
        if (payload.error) { failure = payload.error; return; } // the stream ended in an error
        if (payload.usage) usage = payload.usage;
        if (payload.crucible) info = payload.crucible;
        (payload.choices || []).forEach(function (c) {
          if (c.delta && c.delta.content) { answer += c.delta.content; text.textContent = answer; }
        });
      });
    }
    if (failure) {
      // What arrived stays on screen; the answer is incomplete, so it can be asked again.
      turn.dataset.state = "error";
      return showError(turn, (failure.message || "The answer broke off.") + " The answer is incomplete.", 0, retry);
    }
    turn.classList.remove("is-streaming");
    turn.dataset.state = "done";
    state.textContent = "";
    history[pane].push({ role: "user", content: messages[messages.length - 1].content });
    history[pane].push({ role: "assistant", content: answer });
    if (info) {
      meta(turn, Object.assign({}, info, {
        prompt_tokens: usage ? usage.prompt_tokens : 0, completion_tokens: usage ? usage.completion_tokens : 0,
      }));
      turn.dataset.responseId = info.response_id;
      turn.querySelector(".turn-feedback").hidden = false;
    }
  }

  function newTurn(pane, prompt) {
    var transcript = document.querySelector("#pane-" + pane + " .transcript");
    var empty = transcript.querySelector(".chat-empty");
    if (empty) empty.remove();
    var turn = template.content.firstElementChild.cloneNode(true);
    turn.querySelector(".turn-user").textContent = prompt;
    transcript.appendChild(turn);
    wireFeedback(turn);
    transcript.scrollTop = transcript.scrollHeight;
    document.getElementById("pane-" + pane).scrollIntoView({ block: "start" });
    return turn;
  }

  function wireFeedback(turn) {
    var fb = turn.querySelector(".turn-feedback");
    var thumb = null;
    fb.querySelectorAll(".thumb").forEach(function (b) {
      b.addEventListener("click", function () {
        thumb = Number(b.dataset.thumb);
        fb.querySelectorAll(".thumb").forEach(function (o) { o.setAttribute("aria-pressed", String(o === b)); });
      });
    });
    fb.addEventListener("submit", async function (e) {
      e.preventDefault();
      var stateEl = fb.querySelector(".feedback-state");
      var rating = fb.elements.rating.value;
      var payload = {
        response_id: Number(turn.dataset.responseId), thumb: thumb,
        rating: rating ? Number(rating) : null,
        tags: Array.from(fb.querySelectorAll("[name=tags]:checked")).map(function (c) { return c.value; }),
        corrected_answer: fb.elements.corrected_answer.value,
      };
      stateEl.textContent = "Saving…";
      var r = await fetch(api + "feedback", { method: "POST", headers: headers(), credentials: "same-origin", body: JSON.stringify(payload) });
      if (r.status === 201) { stateEl.textContent = "Feedback saved. Thank you."; fb.dataset.saved = "1"; return; }
      var err = {};
      try { err = (await r.json()).error || {}; } catch (x) { /* not JSON */ }
      stateEl.textContent = err.message || ("Not saved (HTTP " + r.status + ").");
    });
  }

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    var prompt = form.elements.prompt.value.trim();
    if (!prompt) return;
    var targets = [["a", form.elements.model.value]];
    if (compare.checked && form.elements.model_b.value) targets.push(["b", form.elements.model_b.value]);
    targets.forEach(function (t) {
      var pane = t[0], model = t[1];
      document.querySelector("#pane-" + pane + " .pane-model").textContent = model;
      var messages = history[pane].concat([{ role: "user", content: prompt }]);
      run(pane, model, newTurn(pane, prompt), messages);
    });
    form.elements.prompt.value = "";
  });
  form.elements.prompt.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) form.requestSubmit();
  });
  setCompare();
  form.dataset.ready = "1";
})();
