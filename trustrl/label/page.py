"""The page: one HTML document, its stylesheet and its script, served by the app; nothing
is fetched from anywhere else. Model output and prompts are untrusted: the script puts them
into the page only as text (``textContent``, never ``innerHTML``), and the app's Content
Security Policy allows no inline script, so even markup that got in could not run.

Ranking: the responses stand side by side, numbered 1..K. Build the order best-first by
pressing their numbers (or clicking a response's header), or drag a response (its header or
its chip) into the ranking bar: dropped on a chip it goes before that chip, dropped on the bar
it goes last, dropped on the tray it is unranked. ``t`` then a number: that response ties with
the last one placed; clicking a ``>`` between two groups ties them. ``Enter`` submits,
``u``/Backspace undoes (the last placement, or with none the previous judgement), ``s`` skips,
``c`` clears. Code blocks (```) are shown in monospace with their lines kept.
"""

HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>trustrl label</title>
<link rel="stylesheet" href="app.css">
</head><body data-state="start">
<header>
  <strong>trustrl label</strong>
  <label>annotator <input id="annotator" autocomplete="off" placeholder="your name"></label>
  <button id="start">Start</button>
  <span id="progress"></span>
</header>
<main>
  <section id="prompt-box"><h2>Prompt <span id="item-id"></span></h2><div id="prompt" class="text"></div></section>
  <section id="bar">
    <div id="ranking" class="dropzone"><span class="label">Best &rarr; worst:</span></div>
    <div id="tray" class="dropzone"><span class="label">Unranked:</span></div>
  </section>
  <section id="responses"></section>
  <section id="controls">
    <textarea id="note" rows="2" placeholder="note (optional)"></textarea>
    <div>
      <button id="submit">Submit (Enter)</button> <button id="tie">Tie (t)</button>
      <button id="undo">Undo (u)</button> <button id="skip">Skip (s)</button> <button id="clear">Clear (c)</button>
    </div>
    <p class="help">Keys: <kbd>1</kbd>..<kbd>K</kbd> place a response next (best first) &middot; <kbd>t</kbd> then a
      number: tie with the last &middot; <kbd>Enter</kbd> submit &middot; <kbd>u</kbd> undo &middot; <kbd>s</kbd> skip
      &middot; <kbd>c</kbd> clear. Mouse: drag a response or chip into the ranking; click <b>&gt;</b> to tie.</p>
    <p id="status" role="status"></p>
  </section>
</main>
<script src="app.js"></script>
</body></html>
"""

CSS = """
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d232a; background: #f5f6f8; }
header { display: flex; gap: 12px; align-items: center; flex-wrap: wrap; padding: 10px 16px; background: #1d2b3a; color: #fff; }
header input { font: inherit; padding: 2px 6px; width: 10em; }
#progress { margin-left: auto; font-size: 14px; }
main { padding: 12px 16px; max-width: 1600px; margin: 0 auto; }
h2 { font-size: 14px; margin: 0 0 6px; color: #53606d; text-transform: uppercase; letter-spacing: .04em; }
section { margin-bottom: 12px; }
#prompt-box, .response { background: #fff; border: 1px solid #d5d9de; border-radius: 8px; padding: 10px 12px; }
.text { overflow-wrap: anywhere; }
.text .plain { white-space: pre-wrap; }
.text pre { background: #f0f2f5; border-radius: 6px; padding: 8px; overflow-x: auto; margin: 6px 0; font-size: 13px; }
#bar { display: flex; gap: 12px; flex-wrap: wrap; }
.dropzone { min-height: 48px; border: 2px dashed #b8c0c9; border-radius: 8px; padding: 6px 8px; display: flex;
  gap: 6px; align-items: center; flex-wrap: wrap; background: #fff; }
#ranking { flex: 3 1 420px; }
#tray { flex: 1 1 200px; }
.dropzone.over { border-color: #2f6fdb; background: #eef4ff; }
.label { color: #53606d; font-size: 13px; margin-right: 4px; }
.group { display: inline-flex; gap: 4px; align-items: center; padding: 2px; border-radius: 8px; }
.group.tied { background: #fff4d6; }
.chip { display: inline-block; min-width: 34px; text-align: center; padding: 4px 10px; border-radius: 16px;
  background: #2f6fdb; color: #fff; font-weight: 600; cursor: grab; user-select: none; touch-action: none; }
#tray .chip { background: #8a96a3; }
.sep { cursor: pointer; color: #53606d; font-weight: 700; padding: 0 4px; user-select: none; }
.eq { color: #9a6b00; font-weight: 700; }
#responses { display: grid; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr)); gap: 12px; }
.response header { all: unset; display: flex; justify-content: space-between; align-items: center; cursor: grab;
  user-select: none; touch-action: none; font-weight: 600; margin-bottom: 6px; }
.response.ranked { border-color: #2f6fdb; box-shadow: 0 0 0 1px #2f6fdb inset; }
.badge { font-size: 12px; padding: 1px 8px; border-radius: 10px; background: #e3e7ec; color: #36414c; }
.response.ranked .badge { background: #2f6fdb; color: #fff; }
#controls textarea { width: 100%; font: inherit; }
button { font: inherit; padding: 4px 10px; }
.help { color: #53606d; font-size: 13px; }
kbd { border: 1px solid #b8c0c9; border-bottom-width: 2px; border-radius: 4px; padding: 0 4px; font-size: 12px; background: #fff; }
#status { min-height: 1.4em; font-weight: 600; }
.ghost { position: fixed; pointer-events: none; z-index: 10; opacity: .85; }
body[data-state="done"] #bar, body[data-state="done"] #responses, body[data-state="done"] #controls div { display: none; }
"""

JS = r"""
'use strict';
const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get('token') || '';
let item = null;          // {id, prompt, responses}
let groups = [];          // best first: arrays of response indices
let pendingTie = false;
let drag = null;

function setState(s) { document.body.dataset.state = s; }
function status(msg) { $('status').textContent = msg; }
function annotator() { return $('annotator').value.trim(); }

async function api(path, body) {
  const opts = {headers: {'X-Trustrl-Token': token}};
  if (body !== undefined) {
    opts.method = 'POST';
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({error: 'HTTP ' + r.status}));
  if (!r.ok) throw new Error(data.error || ('HTTP ' + r.status));
  return data;
}

// Untrusted text: text nodes only. Fenced ``` blocks become <pre><code> (still text).
function renderText(el, text) {
  el.replaceChildren();
  String(text).split('```').forEach((part, i) => {
    if (i % 2 === 1) {
      const pre = document.createElement('pre');
      const code = document.createElement('code');
      code.textContent = part.replace(/^[\w+-]*\n/, '');
      pre.appendChild(code);
      el.appendChild(pre);
    } else if (i > 0 ? part.replace(/^\n/, '') : part) {
      const div = document.createElement('div');
      div.className = 'plain';
      div.textContent = i > 0 ? part.replace(/^\n/, '') : part;  // the line break after a fence
      el.appendChild(div);
    }
  });
}

function placed() { return groups.flat(); }
function removeFromGroups(i) {
  groups = groups.map(g => g.filter(x => x !== i)).filter(g => g.length);
}
function place(i) {
  if (!item || i < 0 || i >= item.responses.length) return;
  if (placed().includes(i)) { status('response ' + (i + 1) + ' is ranked already (u undoes)'); return; }
  if (pendingTie && groups.length) groups[groups.length - 1].push(i); else groups.push([i]);
  pendingTie = false;
  status(placed().length === item.responses.length ? 'all ranked: Enter submits' : '');
  render();
}
function ranks() {
  const r = new Array(item.responses.length).fill(0);
  groups.forEach((g, k) => g.forEach(i => { r[i] = k + 1; }));
  return r;
}

function chip(i) {
  const c = document.createElement('span');
  c.className = 'chip';
  c.dataset.index = i;
  c.textContent = String(i + 1);
  c.title = 'response ' + (i + 1);
  return c;
}

function render() {
  const ranking = $('ranking'), tray = $('tray');
  ranking.querySelectorAll('.group, .sep').forEach(e => e.remove());
  tray.querySelectorAll('.chip').forEach(e => e.remove());
  groups.forEach((g, k) => {
    if (k > 0) {
      const sep = document.createElement('span');
      sep.className = 'sep';
      sep.dataset.before = k;
      sep.textContent = '>';
      sep.title = 'click: tie these two';
      ranking.appendChild(sep);
    }
    const box = document.createElement('span');
    box.className = 'group' + (g.length > 1 ? ' tied' : '');
    g.forEach((i, n) => {
      if (n > 0) { const eq = document.createElement('span'); eq.className = 'eq'; eq.textContent = '='; box.appendChild(eq); }
      box.appendChild(chip(i));
    });
    ranking.appendChild(box);
  });
  if (!item) return;
  const r = ranks();
  item.responses.forEach((_, i) => { if (!r[i]) tray.appendChild(chip(i)); });
  document.querySelectorAll('.response').forEach(card => {
    const i = Number(card.dataset.index);
    card.classList.toggle('ranked', r[i] > 0);
    card.querySelector('.badge').textContent = r[i] ? ('rank ' + r[i] + (groups[r[i] - 1].length > 1 ? ' (tie)' : '')) : 'unranked';
  });
}

function showItem(data) {
  item = data.item;
  groups = [];
  pendingTie = false;
  $('note').value = '';
  $('item-id').textContent = '#' + item.id;
  document.body.dataset.item = item.id;
  renderText($('prompt'), item.prompt);
  const box = $('responses');
  box.replaceChildren();
  item.responses.forEach((text, i) => {
    const card = document.createElement('article');
    card.className = 'response';
    card.dataset.index = i;
    const head = document.createElement('header');
    head.dataset.index = i;
    head.className = 'handle';
    const name = document.createElement('span');
    name.textContent = 'Response ' + (i + 1);
    const badge = document.createElement('span');
    badge.className = 'badge';
    head.append(name, badge);
    const body = document.createElement('div');
    body.className = 'text';
    renderText(body, text);
    card.append(head, body);
    box.appendChild(card);
  });
  if (data.previous) {  // an undone judgement comes back as it was
    const prev = data.previous;
    const order = [...new Set(prev.ranks)].sort((a, b) => a - b);
    groups = order.map(k => prev.ranks.map((x, i) => x === k ? i : -1).filter(i => i >= 0));
    $('note').value = prev.note || '';
  }
  render();
  if (document.activeElement && document.activeElement.tagName === 'BUTTON') document.activeElement.blur();
  setState('ready');
}

function showProgress(p) {
  if (!p) return;
  $('progress').textContent = 'you: ' + p.ranked + ' ranked, ' + p.skipped + ' skipped \u00b7 items complete: '
    + p.complete + '/' + p.items + ' \u00b7 all rankings: ' + p.rankings + '/' + p.needed;
}

async function load(previous) {
  const who = annotator();
  if (!who) { status('enter your name first'); $('annotator').focus(); return; }
  localStorage.setItem('trustrl-annotator', who);
  setState('busy');
  try {
    const data = await api('api/item?annotator=' + encodeURIComponent(who));
    showProgress(data.progress);
    if (data.done) { item = null; setState('done'); status('All items are done. Thank you!'); return; }
    if (data.waiting) { setState('waiting'); status('sampling responses\u2026'); setTimeout(() => load(previous), 500); return; }
    if (previous && previous.item === data.item.id) data.previous = previous;
    showItem(data);
  } catch (e) { setState('error'); status('error: ' + e.message); }
}

async function submit() {
  if (!item) return;
  if (placed().length !== item.responses.length) { status('rank all ' + item.responses.length + ' responses first'); return; }
  setState('busy');
  try {
    await api('api/rank', {annotator: annotator(), item: item.id, ranks: ranks(), note: $('note').value});
    status('saved');
    await load();
  } catch (e) { setState('ready'); status('error: ' + e.message); }
}
async function skip() {
  if (!item) return;
  setState('busy');
  try { await api('api/skip', {annotator: annotator(), item: item.id, note: $('note').value}); status('skipped'); await load(); }
  catch (e) { setState('ready'); status('error: ' + e.message); }
}
async function undo() {
  if (item && groups.length) {
    const last = groups[groups.length - 1];
    last.pop();
    groups = groups.filter(g => g.length);
    render();
    return;
  }
  setState('busy');
  try {
    const data = await api('api/undo', {annotator: annotator()});
    status(data.undone ? 'undone: item #' + data.undone.item : 'nothing to undo');
    await load(data.undone);
  } catch (e) { setState('ready'); status('error: ' + e.message); }
}

document.addEventListener('keydown', (e) => {
  const t = e.target;
  if (t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA')) {
    if (t.id === 'annotator' && e.key === 'Enter') { e.preventDefault(); load(); }
    return;
  }
  if (e.ctrlKey || e.metaKey || e.altKey || document.body.dataset.state !== 'ready') return;
  if (/^[1-9]$/.test(e.key)) { place(Number(e.key) - 1); }
  else if (e.key === 't') { pendingTie = true; status('tie: the next response ties with the last placed'); }
  else if (e.key === 'Enter') { submit(); }
  else if (e.key === 'u' || e.key === 'Backspace') { undo(); }
  else if (e.key === 's') { skip(); }
  else if (e.key === 'c' || e.key === 'Escape') { groups = []; pendingTie = false; render(); }
  else return;
  e.preventDefault();
});

// Drag and drop with pointer events (mouse, pen and touch alike).
document.addEventListener('pointerdown', (e) => {
  const src = e.target.closest('.chip, .response header');
  if (!src || !item || document.body.dataset.state !== 'ready') return;
  e.preventDefault();
  drag = {index: Number(src.dataset.index), x: e.clientX, y: e.clientY, moved: false, ghost: null};
});
document.addEventListener('pointermove', (e) => {
  if (!drag) return;
  if (!drag.moved && Math.hypot(e.clientX - drag.x, e.clientY - drag.y) < 4) return;
  if (!drag.ghost) {
    drag.moved = true;
    drag.ghost = chip(drag.index);
    drag.ghost.classList.add('ghost');
    document.body.appendChild(drag.ghost);
  }
  drag.ghost.style.left = (e.clientX + 6) + 'px';
  drag.ghost.style.top = (e.clientY + 6) + 'px';
  document.querySelectorAll('.dropzone').forEach(z => z.classList.remove('over'));
  const zone = document.elementFromPoint(e.clientX, e.clientY);
  const over = zone && zone.closest('.dropzone');
  if (over) over.classList.add('over');
});
document.addEventListener('pointerup', (e) => {
  if (!drag) return;
  const d = drag;
  drag = null;
  document.querySelectorAll('.dropzone').forEach(z => z.classList.remove('over'));
  if (d.ghost) d.ghost.remove();
  if (!d.moved) { if (!placed().includes(d.index)) place(d.index); return; }  // a click places it next
  const target = document.elementFromPoint(e.clientX, e.clientY);
  if (!target) return;
  const onChip = target.closest('#ranking .chip');
  if (onChip && Number(onChip.dataset.index) !== d.index) {
    const before = Number(onChip.dataset.index);
    removeFromGroups(d.index);
    const k = groups.findIndex(g => g.includes(before));
    groups.splice(k, 0, [d.index]);
  } else if (target.closest('#ranking') && !onChip) {
    removeFromGroups(d.index);
    groups.push([d.index]);
  } else if (target.closest('#tray')) {
    removeFromGroups(d.index);
  }
  render();
});
document.addEventListener('click', (e) => {
  const sep = e.target.closest('.sep');
  if (!sep) return;
  const k = Number(sep.dataset.before);
  groups.splice(k - 1, 2, groups[k - 1].concat(groups[k]));
  render();
});

$('start').addEventListener('click', () => load());
$('submit').addEventListener('click', submit);
$('skip').addEventListener('click', skip);
$('undo').addEventListener('click', undo);
$('tie').addEventListener('click', () => { pendingTie = true; status('tie: the next response ties with the last placed'); });
$('clear').addEventListener('click', () => { groups = []; pendingTie = false; render(); });
const saved = localStorage.getItem('trustrl-annotator');
if (saved) { $('annotator').value = saved; load(); }
"""
