// nightshift operator dashboard. Everything the server sends is untrusted:
// it only ever reaches the page as text nodes / attribute values, never as HTML.
'use strict';
(() => {
  const REFRESH_MS = 2000;
  const SHARD_TABLE_CAP = 500;
  const STALE_WORKER_S = 60;

  const $ = (id) => document.getElementById(id);
  const nf = new Intl.NumberFormat();
  const nf1 = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });

  // ---------- DOM helpers ----------

  // el('td', { className, title, dataset, style }, ...children): children are nodes or plain text.
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    setProps(node, props);
    node.append(...children.flat().filter((c) => c !== null && c !== undefined).map(toNode));
    return node;
  }
  function toNode(c) { return c instanceof Node ? c : document.createTextNode(String(c)); }
  function setProps(node, props) {
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null) continue;
      if (k === 'dataset') Object.assign(node.dataset, v);
      else if (k === 'style') Object.assign(node.style, v);
      else if (k in node) node[k] = v;
      else node.setAttribute(k, v);
    }
  }
  function svgEl(tag, attrs, text) {
    const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Keep one <tr data-{attr}> per item, rebuilding a row's cells only when its data changed
  // (so hover tooltips and text selection survive the 2 s refresh).
  function syncRows(tbody, items, attr, keyOf, cellsOf, emptyText, sigOf = JSON.stringify) {
    const old = new Map();
    for (const tr of tbody.children) if (tr.dataset[attr] !== undefined) old.set(tr.dataset[attr], tr);
    const rows = items.map((item) => {
      const key = String(keyOf(item));
      const sig = sigOf(item);
      let tr = old.get(key);
      if (!tr) tr = el('tr', { dataset: { [attr]: key } });
      if (tr._sig !== sig) { tr.replaceChildren(...cellsOf(item)); tr._sig = sig; }
      return tr;
    });
    if (!rows.length) {
      const cols = tbody.parentElement.tHead.rows[0].cells.length;
      rows.push(el('tr', { className: 'empty' }, el('td', { colSpan: cols }, emptyText)));
    }
    rows.forEach((tr, i) => { if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null); });
    while (tbody.children.length > rows.length) tbody.lastElementChild.remove();
  }

  // ---------- formatting ----------

  const isNum = (n) => typeof n === 'number' && Number.isFinite(n);
  const fmtNum = (n) => (isNum(n) ? nf.format(n) : '-');
  const fmtRate = (n) => (isNum(n) ? nf1.format(n) : '-');
  const fmtTime = (ms) => (isNum(ms) ? new Date(ms).toLocaleString() : '-');
  const pad2 = (n) => String(n).padStart(2, '0');
  const clock = (d) => `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  const truncate = (s, n) => (s.length > n ? s.slice(0, n - 1) + '…' : s);
  const fraction = (done, total) => (total > 0 ? Math.min(1, Math.max(0, done / total)) : 0);

  function fmtDuration(s) {
    if (!isNum(s) || s < 0) return '-';
    s = Math.round(s);
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${sec}s`;
    return `${sec}s`;
  }
  function fmtBytes(b) {
    if (!isNum(b)) return '-';
    const gib = b / 2 ** 30;
    return gib >= 1 ? `${nf1.format(gib)} GiB` : `${nf1.format(b / 2 ** 20)} MiB`;
  }
  function progressText(j) {
    const pct = Math.floor(fraction(j.rows_done, j.rows_total) * 100);
    return `${fmtNum(j.rows_done)} / ${fmtNum(j.rows_total)} (${pct}%)`;
  }
  const badge = (state) => el('span', { className: `badge state-${state}` }, state);
  const jobLink = (id, text) => el('a', { href: `#/jobs/${encodeURIComponent(id)}` }, text);
  function errText(msg, n = 60) {
    return el('span', { className: 'err-msg', title: msg }, truncate(msg, n));
  }

  // ---------- API ----------

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }
  const isAuthError = (e) => e && (e.status === 401 || e.status === 403);

  async function getJson(path) {
    let res;
    try {
      res = await fetch(path, { credentials: 'same-origin', cache: 'no-store', headers: { Accept: 'application/json' } });
    } catch (e) {
      throw new ApiError(0, `${path}: network error (${e.message})`);
    }
    if (!res.ok) {
      let detail = res.statusText;
      try {
        const body = await res.json();
        if (body && body.message) detail = body.code ? `${body.code}: ${body.message}` : body.message;
      } catch { /* not JSON: keep the status text */ }
      throw new ApiError(res.status, `${path}: HTTP ${res.status} ${detail}`);
    }
    try { return await res.json(); } catch { throw new ApiError(res.status, `${path}: response is not JSON`); }
  }

  // ---------- login / app visibility ----------

  const loginRefused = new URLSearchParams(location.search).get('login') === 'refused';

  function showLogin() {
    $('app').hidden = true;
    $('login-section').hidden = false;
    if (loginRefused && !$('login-error')) {
      $('login').append(el('p', { id: 'login-error', className: 'alert', role: 'alert' }, 'Wrong token: refused.'));
    }
    if (document.activeElement !== $('token')) $('token').focus();
  }
  function showApp() {
    $('login-section').hidden = true;
    $('app').hidden = false;
  }

  // ---------- overview ----------

  function jobCells(j) {
    const errors = el('td', { className: j.error_rows > 0 || j.error ? 'errors bad' : 'errors' }, fmtNum(j.error_rows));
    if (j.error) errors.append(' ', errText(j.error));
    return [
      el('td', { className: 'num' }, jobLink(j.id, String(j.id))),
      el('td', { className: 'name', title: j.name }, j.name),
      el('td', {}, badge(j.state)),
      el('td', { className: 'progress' },
        el('div', { className: 'bar' }, el('div', { className: 'bar-fill', style: { width: `${fraction(j.rows_done, j.rows_total) * 100}%` } })),
        el('span', { className: 'progress-text' }, progressText(j))),
      el('td', { className: 'num' }, fmtRate(j.rows_per_s)),
      el('td', { className: 'num' }, fmtDuration(j.eta_s)),
      errors,
      el('td', { className: 'time' }, fmtTime(j.created_at_ms)),
    ];
  }

  function renderJobs(data) {
    const jobs = data.jobs || [];
    syncRows($('jobs').querySelector('tbody'), jobs, 'jobId', (j) => j.id, jobCells, 'No jobs yet.');
    const note = $('jobs-note');
    note.hidden = data.next_before === undefined || data.next_before === null;
    note.textContent = `Showing the newest ${fmtNum(jobs.length)} jobs.`;
  }

  const workerAge = (w) => (Date.now() - w.last_seen_ms) / 1000;

  function workerCells(w) {
    const leases = (w.leases || []).map((l) =>
      el('div', { className: 'lease' }, jobLink(l.job_id, `job ${l.job_id}`),
        ` / shard ${l.shard_id}: ${fmtNum(l.rows_done)}/${fmtNum(l.rows)}`));
    const gpus = (w.gpus || []).map((g) =>
      el('span', {
        className: 'gpu',
        title: `GPU ${g.index}: ${fmtRate(g.utilization_percent)}% busy, ` +
          `memory ${fmtBytes(g.memory_used_bytes)} / ${fmtBytes(g.memory_total_bytes)}`,
      }, `${Math.round(g.utilization_percent)}%`));
    const age = workerAge(w);
    return [
      el('td', { className: 'name', title: w.id }, w.id),
      el('td', { className: 'num' }, isNum(w.slots) ? fmtNum(w.slots) : '-'),
      el('td', {}, leases.length ? leases : '-'),
      el('td', { className: 'num' }, fmtRate(w.rows_per_s)),
      el('td', {}, gpus.length ? gpus : '-'),
      el('td', { className: age > STALE_WORKER_S ? 'time stale' : 'time', title: `${fmtDuration(age)} ago` },
        fmtTime(w.last_seen_ms)),
    ];
  }

  function renderWorkers(data) {
    syncRows($('workers').querySelector('tbody'), data.workers || [], 'workerId', (w) => w.id, workerCells,
      'No workers have checked in.', (w) => JSON.stringify(w) + (workerAge(w) > STALE_WORKER_S));
  }

  function scheduleCells(s) {
    const last = (s.fires || []).reduce((a, f) => (!a || f.fire_at_ms > a.fire_at_ms ? f : a), null);
    const lastCell = el('td', {});
    if (last) {
      lastCell.append(fmtTime(last.fire_at_ms), ' ');
      if (isNum(last.job_id)) lastCell.append(jobLink(last.job_id, `job ${last.job_id}`));
      if (last.error) lastCell.append(' ', errText(last.error, 50));
    } else lastCell.append('never');
    return [
      el('td', { className: 'name', title: s.spec || s.name }, s.name),
      el('td', { title: `catch-up: ${s.catch_up}` }, el('code', {}, s.cron)),
      el('td', {}, s.timezone),
      el('td', { className: s.paused ? 'paused' : '' }, s.paused ? 'yes' : 'no'),
      el('td', { className: 'time' }, fmtTime(s.next_fire_at_ms)),
      lastCell,
    ];
  }

  function renderSchedules(data) {
    syncRows($('schedules').querySelector('tbody'), data.schedules || [], 'schedule', (s) => s.name,
      scheduleCells, 'No schedules.');
  }

  // ---------- job page ----------

  let currentJob = null;   // last JobView shown on the job page
  let shownJobId = null;
  let shardsSig = null;
  let throughputSig = null;

  function resetJobPage(id) {
    shownJobId = id;
    currentJob = null;
    shardsSig = throughputSig = null;
    $('job-id').textContent = `job ${id}`;
    $('job-name').textContent = '';
    $('job-state').textContent = '';
    $('job-state').className = 'badge';
    $('job-progress').textContent = 'loading…';
    $('job-progress').dataset.rowsDone = '';
    $('job-bar-fill').style.width = '0';
    $('job-error').hidden = true;
    for (const id of ['job-facts', 'shard-strip', 'throughput', 'throughput-caption']) $(id).replaceChildren();
    $('shards').tBodies[0].replaceChildren();
    $('shards-note').hidden = true;
  }

  function renderJob(j) {
    currentJob = j;
    $('job-id').textContent = `job ${j.id}`;
    $('job-name').textContent = j.name;
    $('job-state').className = `badge state-${j.state}`;
    $('job-state').textContent = j.state;
    document.title = `${j.name} · nightshift`;
    const progress = $('job-progress');
    progress.textContent = progressText(j);
    progress.dataset.rowsDone = String(j.rows_done);
    $('job-bar-fill').style.width = `${fraction(j.rows_done, j.rows_total) * 100}%`;
    $('job-error').hidden = !j.error;
    $('job-error').textContent = j.error || '';

    const sh = j.shards || {};
    const n = j.notify;
    const facts = [
      ['Rows/s', fmtRate(j.rows_per_s)],
      ['ETA', fmtDuration(j.eta_s)],
      ['Error rows (poison)', fmtNum(j.error_rows)],
      ['Shards', `${fmtNum(sh.pending)} pending · ${fmtNum(sh.leased)} leased · ${fmtNum(sh.done)} done · ${fmtNum(sh.dead)} dead`],
      ['Priority', fmtNum(j.priority)],
      ['Batch rows', isNum(j.batch_rows) ? fmtNum(j.batch_rows) : null],
      ['Output URI', el('code', {}, j.output_uri)],
      ['Created', fmtTime(j.created_at_ms)],
      ['Finished', isNum(j.finished_at_ms) ? fmtTime(j.finished_at_ms) : null],
      ['Model held by', j.model_held_by && j.model_held_by.length
        ? j.model_held_by.map((h) => `${h.worker} (${h.device})`).join(', ') : null],
      ['Notify', n ? el('span', { title: n.url },
        [n.state, `${fmtNum(n.attempts)} attempt${n.attempts === 1 ? '' : 's'}`,
          isNum(n.last_status) ? `last HTTP ${n.last_status}` : null, n.last_error || null]
          .filter(Boolean).join(' · ')) : null],
    ];
    $('job-facts').replaceChildren(...facts.filter(([, v]) => v !== null)
      .flatMap(([k, v]) => [el('dt', {}, k), el('dd', {}, v)]));
  }

  function shardRange(s) {
    return s.rows > 0 ? `${fmtNum(s.row_start)}–${fmtNum(s.row_start + s.rows - 1)}` : `${fmtNum(s.row_start)} (empty)`;
  }

  function shardTitle(s) {
    return [`shard ${s.id}`, `rows ${shardRange(s)}`, s.state,
      `${fmtNum(s.rows_done)}/${fmtNum(s.rows)} done`,
      s.error_rows ? `${fmtNum(s.error_rows)} error rows` : null,
      `attempts ${s.attempts}`, s.worker ? `worker ${s.worker}` : null,
      s.error ? `error: ${s.error}` : null].filter(Boolean).join(' · ');
  }

  function renderShards(data) {
    const shards = data.shards || [];
    const total = (currentJob && currentJob.rows_total) || shards.reduce((a, s) => a + s.rows, 0) || 1;
    const sig = total + JSON.stringify(shards);
    if (sig === shardsSig) return;
    shardsSig = sig;

    $('shard-strip').replaceChildren(...shards.map((s) => {
      const seg = el('div', {
        className: `shard shard-${s.state}`, title: shardTitle(s),
        dataset: { shardId: s.id }, style: { width: `${(s.rows / total) * 100}%` },
      });
      if (s.state === 'leased') {
        seg.append(el('div', { className: 'shard-fill', style: { width: `${fraction(s.rows_done, s.rows) * 100}%` } }));
      }
      return seg;
    }));

    const shown = shards.slice(0, SHARD_TABLE_CAP);
    $('shards').tBodies[0].replaceChildren(...shown.map((s) => el('tr', { dataset: { shardId: s.id } },
      el('td', { className: 'num' }, String(s.id)),
      el('td', { className: 'range' }, shardRange(s)),
      el('td', {}, el('span', { className: `badge shard-${s.state}` }, s.state)),
      el('td', { className: 'num' }, fmtNum(s.attempts)),
      el('td', { className: 'num' }, `${fmtNum(s.rows_done)} / ${fmtNum(s.rows)}`),
      el('td', { className: s.error_rows ? 'num bad' : 'num' }, fmtNum(s.error_rows)),
      el('td', { className: 'name' }, s.worker || '-'),
      el('td', {}, s.error ? errText(s.error, 80) : ''))));
    if (!shards.length) {
      $('shards').tBodies[0].append(el('tr', { className: 'empty' }, el('td', { colSpan: 8 }, 'No shards planned yet.')));
    }
    const note = $('shards-note');
    note.hidden = shards.length <= SHARD_TABLE_CAP;
    note.textContent = `Showing the first ${fmtNum(SHARD_TABLE_CAP)} of ${fmtNum(shards.length)} shards.`;
  }

  // Bar chart of rows/s per bucket; y axis runs from 0 to the peak, x axis from first to last bucket.
  function renderThroughput(data) {
    const sig = JSON.stringify(data);
    if (sig === throughputSig) return;
    throughputSig = sig;
    const svg = $('throughput');
    const W = 800, H = 180, L = 70, R = 10, T = 10, B = 22;
    const points = data.points || [];
    const secs = (data.bucket_ms || 1000) / 1000;
    const rates = points.map((p) => p.rows / secs);
    svg.replaceChildren();
    if (!points.length) {
      svg.append(svgEl('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', class: 'axis' }, 'No throughput recorded yet.'));
      $('throughput-caption').textContent = '';
      return;
    }
    const max = Math.max(...rates), min = Math.min(...rates);
    const top = max > 0 ? max : 1;
    const plotH = H - T - B, step = (W - L - R) / points.length;
    const gap = step > 4 ? 1 : 0;
    points.forEach((p, i) => {
      const h = (rates[i] / top) * plotH;
      const bar = svgEl('rect', { x: L + i * step + gap / 2, y: T + plotH - h, width: Math.max(step - gap, 0.5), height: h, class: 'tp-bar' });
      bar.append(svgEl('title', {}, `${clock(new Date(p.at_ms))}: ${fmtRate(rates[i])} rows/s (${fmtNum(p.rows)} rows)`));
      svg.append(bar);
    });
    svg.append(
      svgEl('line', { x1: L, y1: T, x2: L, y2: T + plotH, class: 'axis-line' }),
      svgEl('line', { x1: L, y1: T + plotH, x2: W - R, y2: T + plotH, class: 'axis-line' }),
      svgEl('text', { x: L - 6, y: T + 10, 'text-anchor': 'end', class: 'axis' }, `${fmtRate(max)}/s`),
      svgEl('text', { x: L - 6, y: T + plotH, 'text-anchor': 'end', class: 'axis' }, '0/s'),
      svgEl('text', { x: L, y: H - 4, class: 'axis' }, clock(new Date(points[0].at_ms))),
      svgEl('text', { x: W - R, y: H - 4, 'text-anchor': 'end', class: 'axis' }, clock(new Date(points[points.length - 1].at_ms))),
    );
    $('throughput-caption').textContent =
      `rows/s per ${fmtDuration(secs)} bucket · min ${fmtRate(min)} · max ${fmtRate(max)} · latest ${fmtRate(rates[rates.length - 1])}`;
  }

  // ---------- routing and the refresh loop ----------

  function parseRoute() {
    const m = /^#\/jobs\/(\d+)\/?$/.exec(location.hash);
    return { job: m ? m[1] : null };
  }

  function requestsFor(route) {
    if (route.job === null) {
      return [['/v1/jobs?limit=50', renderJobs], ['/v1/workers', renderWorkers], ['/v1/schedules', renderSchedules]];
    }
    const base = `/v1/jobs/${route.job}`;
    return [[base, renderJob], [`${base}/shards`, renderShards], [`${base}/throughput`, renderThroughput]];
  }

  let generation = 0;  // bumped on every route change; stale answers are dropped
  let timer = null, busy = false, again = false;

  async function tick() {
    clearTimeout(timer);
    timer = null;
    if (busy) { again = true; return; }  // never overlap: run again once the current one ends
    busy = true;
    again = false;
    const gen = generation;
    const requests = requestsFor(parseRoute());
    let results;
    try {
      results = await Promise.allSettled(requests.map(([path]) => getJson(path)));
    } finally {
      busy = false;
    }
    let keepPolling = true;
    if (gen === generation) keepPolling = apply(results, requests.map(([, render]) => render));
    if (again || gen !== generation) tick();
    else if (keepPolling) timer = setTimeout(tick, REFRESH_MS);
  }

  // Renders what arrived; returns false when the session is not authorised (polling stops).
  function apply(results, renders) {
    const errors = results.filter((r) => r.status === 'rejected').map((r) => r.reason);
    if (errors.some(isAuthError)) { showLogin(); return false; }
    showApp();
    let rendered = false;
    results.forEach((r, i) => {
      if (r.status !== 'fulfilled') return;
      try { renders[i](r.value); rendered = true; } catch (e) { errors.push(e); }
    });
    if (rendered) $('updated').textContent = `updated ${clock(new Date())}`;
    const msg = errors.map((e) => (e && e.message) || String(e)).join(' · ');
    $('refresh-error').textContent = msg;
    $('refresh-error').title = msg;
    $('refresh-error').hidden = !msg;
    return true;
  }

  function onRoute() {
    generation++;
    const route = parseRoute();
    $('overview').hidden = route.job !== null;
    $('job-page').hidden = route.job === null;
    if (route.job === null) document.title = 'nightshift';
    else if (route.job !== shownJobId) { resetJobPage(route.job); document.title = `job ${route.job} · nightshift`; }
    $('refresh-error').hidden = true;
    tick();
  }

  window.addEventListener('hashchange', onRoute);
  if (loginRefused) showLogin();
  onRoute();
})();
