// infdit serve: the page. Plain JavaScript, no build step; the API is docs/api.md.
'use strict';
(function () {
  const TOKEN = new URLSearchParams(location.search).get('token') || '';
  const $ = (s) => document.querySelector(s);
  const jobs = new Map();
  const mine = new Set(); // jobs uploaded from this page: shown in the viewer when done
  let viewing = null;

  function withToken(url) {
    return TOKEN ? url + (url.includes('?') ? '&' : '?') + 'token=' + encodeURIComponent(TOKEN) : url;
  }
  async function api(path, opts) {
    opts = opts || {};
    opts.headers = Object.assign({}, opts.headers || {}, TOKEN ? { Authorization: 'Bearer ' + TOKEN } : {});
    const r = await fetch(path, opts);
    const text = await r.text();
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch (e) { body = { error: text }; }
    if (!r.ok) throw new Error((body && body.error) || ('HTTP ' + r.status));
    return body;
  }
  function notice(msg) {
    const n = $('#notice');
    n.textContent = msg || '';
    n.hidden = !msg;
  }
  function fmtSeconds(s) {
    if (s == null || !isFinite(s)) return '';
    s = Math.max(0, Math.round(s));
    return s < 60 ? s + ' s' : Math.floor(s / 60) + ' min ' + (s % 60) + ' s';
  }

  // ---- uploads
  function options() {
    const o = { scale: Number($('#scale').value), seed: Number($('#seed').value || 0) };
    const steps = $('#steps').value.trim();
    if (steps) o.steps = Number(steps);
    const ensemble = $('#ensemble').value;
    if (ensemble) o.ensemble = Number(ensemble);
    if ($('#format').value) o.format = $('#format').value;
    return o;
  }
  async function upload(files) {
    notice('');
    for (const f of files) {
      const fd = new FormData();
      fd.append('image', f, f.name);
      fd.append('options', JSON.stringify(options()));
      try {
        const j = await api('/api/jobs', { method: 'POST', body: fd });
        mine.add(j.id);
        update(j);
      } catch (e) {
        notice(f.name + ': ' + e.message);
      }
    }
  }
  const drop = $('#drop');
  ['dragenter', 'dragover'].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add('over'); }));
  ['dragleave', 'drop'].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove('over'); }));
  drop.addEventListener('drop', (e) => { if (e.dataTransfer && e.dataTransfer.files.length) upload(e.dataTransfer.files); });
  document.addEventListener('dragover', (e) => e.preventDefault());
  document.addEventListener('drop', (e) => e.preventDefault());
  $('#file').addEventListener('change', (e) => { upload(e.target.files); e.target.value = ''; });
  $('#file').addEventListener('focus', () => document.body.classList.add('file-focus'));
  $('#file').addEventListener('blur', () => document.body.classList.remove('file-focus'));

  // ---- the queue
  function button(label, fn, cls) {
    const b = document.createElement('button');
    b.type = 'button';
    b.textContent = label;
    if (cls) b.className = cls;
    b.addEventListener('click', fn);
    return b;
  }
  function act(fn) {
    return async () => { try { notice(''); await fn(); } catch (e) { notice(e.message); } };
  }
  function render(j) {
    let li = document.getElementById('job-' + j.id);
    if (!li) {
      li = document.createElement('li');
      li.id = 'job-' + j.id;
      li.className = 'job';
      li.innerHTML = '<div class="top"><span class="name"></span><span class="state"></span></div>' +
        '<progress max="1" value="0"></progress><div class="meta"></div><p class="error" hidden></p><div class="actions"></div>';
      $('#jobs').prepend(li);
    }
    li.dataset.state = j.state;
    li.querySelector('.name').textContent = j.name;
    li.querySelector('.name').title = j.name;
    const st = li.querySelector('.state');
    st.textContent = j.state + (j.state === 'queued' && j.queue_position ? ' #' + j.queue_position : '');
    st.className = 'state ' + j.state;
    const p = li.querySelector('progress');
    p.value = j.progress.fraction;
    p.setAttribute('aria-label', j.name + ' progress');
    const pct = Math.floor(j.progress.fraction * 100) + '%';
    let meta = j.input.width + '×' + j.input.height + ' → ' + j.output.width + '×' + j.output.height + ' · ' + pct;
    if (j.state === 'running' && j.eta_seconds != null) meta += ' · ETA ' + fmtSeconds(j.eta_seconds);
    if (j.state === 'done') meta += ' · ' + fmtSeconds(j.timings.run_seconds);
    li.querySelector('.meta').textContent = meta;
    const err = li.querySelector('.error');
    err.textContent = j.error ? 'Error: ' + j.error : '';
    err.hidden = !j.error;
    const actions = li.querySelector('.actions');
    const key = j.state;
    if (actions.dataset.key !== key) {
      actions.dataset.key = key;
      actions.textContent = '';
      if (j.state === 'done') {
        actions.append(button('View', () => view(j.id), 'view'));
        const a = document.createElement('a');
        a.className = 'button download';
        a.textContent = 'Download';
        a.href = withToken(j.links.output + '?download=1');
        actions.append(a);
      }
      if (j.state === 'queued' || j.state === 'running') actions.append(button('Cancel', act(() => api('/api/jobs/' + j.id + '/cancel', { method: 'POST' }).then(update)), 'cancel'));
      if (j.state === 'failed' || j.state === 'cancelled') actions.append(button('Retry', act(() => api('/api/jobs/' + j.id + '/retry', { method: 'POST' }).then(update)), 'retry'));
      if (j.state !== 'running') actions.append(button('Delete', act(() => api('/api/jobs/' + j.id, { method: 'DELETE' }).then(() => remove(j.id))), 'delete'));
    }
    $('#empty').hidden = jobs.size > 0;
  }
  function update(j) {
    jobs.set(j.id, j);
    render(j);
    if (j.state === 'done' && mine.has(j.id)) { mine.delete(j.id); view(j.id); }
  }
  function remove(id) {
    jobs.delete(id);
    const li = document.getElementById('job-' + id);
    if (li) li.remove();
    if (viewing === id) { $('#viewer').hidden = true; viewing = null; }
    $('#empty').hidden = jobs.size > 0;
  }
  async function refresh() {
    try {
      const r = await api('/api/jobs');
      const seen = new Set();
      for (const j of r.jobs) { seen.add(j.id); update(j); }
      for (const id of Array.from(jobs.keys())) if (!seen.has(id)) remove(id);
    } catch (e) { notice('Cannot reach the server: ' + e.message); }
  }
  function listen() {
    const es = new EventSource(withToken('/api/events'));
    es.addEventListener('job', (e) => update(JSON.parse(e.data)));
    es.addEventListener('deleted', (e) => remove(JSON.parse(e.data).id));
    es.onerror = () => { es.close(); setTimeout(() => { refresh(); listen(); }, 2000); };
  }
  async function health() {
    try {
      const h = await (await fetch('/health')).json();
      $('#health').textContent = h.device + ' · ' + h.workers + ' worker' + (h.workers > 1 ? 's' : '') + ' · ' + h.queued + ' queued';
    } catch (e) { $('#health').textContent = 'server unreachable'; }
  }

  // ---- the before/after viewer: both images in one transformed layer (synchronized zoom and
  // pan), the output clipped at the divider; zoom 1 = one image pixel per screen pixel.
  const stage = $('#stage'), layer = $('#layer'), before = $('#before'), after = $('#after');
  const v = { zoom: 1, x: 0, y: 0, w: 0, h: 0, split: 0.5 };
  function apply() {
    layer.style.transform = 'translate(' + v.x + 'px,' + v.y + 'px) scale(' + v.zoom + ')';
    const sw = stage.clientWidth;
    const cut = (v.split * sw - v.x) / v.zoom; // the divider, in image pixels
    after.style.clipPath = 'inset(0 0 0 ' + Math.max(0, Math.min(v.w, cut)).toFixed(2) + 'px)';
    $('#divider').style.left = (v.split * 100) + '%';
    $('#zoom-label').textContent = Math.round(v.zoom * 100) + '%';
    $('#split').value = Math.round(v.split * 100);
    $('#split-label').textContent = Math.round(v.split * 100) + '%';
  }
  function zoomAt(z, cx, cy) {
    z = Math.min(32, Math.max(0.05, z));
    if (cx == null) { cx = stage.clientWidth / 2; cy = stage.clientHeight / 2; }
    v.x = cx - (cx - v.x) * (z / v.zoom);
    v.y = cy - (cy - v.y) * (z / v.zoom);
    v.zoom = z;
    apply();
  }
  function center(z) {
    v.zoom = z;
    v.x = (stage.clientWidth - v.w * z) / 2;
    v.y = (stage.clientHeight - v.h * z) / 2;
    apply();
  }
  function fit() { center(Math.min(stage.clientWidth / v.w, stage.clientHeight / v.h) || 1); }
  function view(id) {
    const j = jobs.get(id);
    if (!j || j.state !== 'done') return;
    viewing = id;
    v.w = j.output.width; v.h = j.output.height;
    for (const img of [before, after]) { img.width = v.w; img.height = v.h; }
    before.src = withToken(j.links.input);
    after.src = withToken(j.links.output);
    $('#viewer-name').textContent = '— ' + j.name;
    $('#download').href = withToken(j.links.output + '?download=1');
    $('#viewer').hidden = false;
    center(1);
  }
  $('#zoom-in').addEventListener('click', () => zoomAt(v.zoom * 2));
  $('#zoom-out').addEventListener('click', () => zoomAt(v.zoom / 2));
  $('#zoom-1').addEventListener('click', () => center(1));
  $('#zoom-fit').addEventListener('click', fit);
  $('#split').addEventListener('input', (e) => { v.split = Number(e.target.value) / 100; apply(); });
  stage.addEventListener('wheel', (e) => {
    e.preventDefault();
    const r = stage.getBoundingClientRect();
    zoomAt(v.zoom * (e.deltaY < 0 ? 1.25 : 0.8), e.clientX - r.left, e.clientY - r.top);
  }, { passive: false });
  let drag = null;
  stage.addEventListener('pointerdown', (e) => {
    const r = stage.getBoundingClientRect();
    const onDivider = Math.abs(e.clientX - r.left - v.split * r.width) < 12;
    drag = { divider: onDivider, sx: e.clientX, sy: e.clientY, x: v.x, y: v.y };
    stage.setPointerCapture(e.pointerId);
    if (!onDivider) stage.classList.add('panning');
  });
  stage.addEventListener('pointermove', (e) => {
    if (!drag) return;
    const r = stage.getBoundingClientRect();
    if (drag.divider) v.split = Math.min(1, Math.max(0, (e.clientX - r.left) / r.width));
    else { v.x = drag.x + e.clientX - drag.sx; v.y = drag.y + e.clientY - drag.sy; }
    apply();
  });
  const end = () => { drag = null; stage.classList.remove('panning'); };
  stage.addEventListener('pointerup', end);
  stage.addEventListener('pointercancel', end);
  stage.addEventListener('keydown', (e) => {
    const step = e.shiftKey ? 100 : 20;
    const keys = {
      ArrowLeft: () => { v.x += step; apply(); }, ArrowRight: () => { v.x -= step; apply(); },
      ArrowUp: () => { v.y += step; apply(); }, ArrowDown: () => { v.y -= step; apply(); },
      '+': () => zoomAt(v.zoom * 2), '=': () => zoomAt(v.zoom * 2), '-': () => zoomAt(v.zoom / 2),
      '0': () => center(1), f: fit, F: fit,
      '[': () => { v.split = Math.max(0, v.split - 0.05); apply(); }, ']': () => { v.split = Math.min(1, v.split + 0.05); apply(); },
    };
    if (keys[e.key]) { e.preventDefault(); keys[e.key](); }
  });
  window.addEventListener('resize', () => { if (viewing) apply(); });

  // A link to a result: /#view=JOB_ID opens it in the viewer.
  refresh().then(() => {
    const m = /^#view=([0-9a-f]{16})$/.exec(location.hash);
    if (m) view(m[1]);
    listen();
  });
  health();
  setInterval(health, 5000);
  window.infdit = { jobs, view, state: v };
})();
