"""The gate family's admin page templates (jinja2, autoescaped, on the core layout and macros).

Kept as Python strings so they ship with the package without any package-data entry.
"""

UNITS = """\
{% extends "base.html" %}
{% from "_macros.html" import page_head, csrf, empty, state, pagination with context %}
{% block content %}
{% call page_head("Gate units", units.total ~ " registered · broker provisioning: " ~ provisioning) %}
  <form method="get" action="/gates" class="search">
    <input name="q" value="{{ q }}" placeholder="Search units" aria-label="Search units">
  </form>
{% endcall %}
<section class="card">
  <h2>Registry</h2>
  {% if units["items"] %}
  <div class="table-wrap">
  <table id="gate-units">
    <thead><tr><th>Controller id</th><th>Hardware id</th><th>Firmware</th><th>Last seen</th><th>State</th></tr></thead>
    <tbody>
    {% for u in units["items"] %}
      <tr>
        <td><a href="/gates/{{ u.controller_id }}"><strong>{{ u.controller_id }}</strong></a></td>
        <td><code>{{ u.hardware_id }}</code></td>
        <td>{{ u.firmware_version }}</td>
        <td class="nowrap" title="{{ u.last_seen|time }}">{{ u.last_seen|ago }}</td>
        <td>{{ state(u.online, "online", "offline") }}</td>
      </tr>
    {% endfor %}
    </tbody>
  </table>
  </div>
  {{ pagination(pager(units.total, units.limit, units.offset, {"q": q})) }}
  {% else %}{{ empty("No gate unit has registered yet. Units register with a provisioning key.") }}{% endif %}
</section>
{% if keys is not none %}
<div class="grid-2">
<section class="card">
  <h2>New provisioning key</h2>
  <form method="post" action="/gates/keys" class="stack" id="new-provisioning-key">
    {{ csrf() }}
    <label>Name<input name="name" required maxlength="64" placeholder="e.g. installer van 3"></label>
    <div class="row">
      <label>Expires in (days, empty: never)<input name="expires_in_days" type="number" min="1" max="3650"></label>
      <label><span><input type="checkbox" name="single_use" value="1"> Single use</span></label>
    </div>
    <button class="btn primary" type="submit">Create key</button>
  </form>
</section>
<section class="card">
  <h2>Provisioning keys</h2>
  {% if keys["items"] %}
  <div class="table-wrap">
  <table id="provisioning-keys">
    <thead><tr>
      <th>Name</th><th>Key</th><th>Uses</th><th>Expires</th><th>State</th><th class="right">Actions</th>
    </tr></thead>
    <tbody>
    {% for k in keys["items"] %}
      <tr>
        <td>{{ k.name }}{% if k.single_use %} <span class="muted small">(single use)</span>{% endif %}</td>
        <td><code>{{ k.prefix }}…</code></td>
        <td>{{ k.uses }}</td>
        <td class="nowrap">{{ k.expires_at|time if k.expires_at else "never" }}</td>
        <td><span class="pill {{ 'ok' if k.state == 'active' else 'muted' }}">{{ k.state }}</span></td>
        <td class="actions">
          {% if k.state == "active" %}
          <form method="post" action="/gates/keys/{{ k.id }}/revoke" class="inline" data-confirm="Revoke {{ k.name }}?">
            {{ csrf() }}<button class="btn small danger" type="submit">Revoke</button>
          </form>
          {% endif %}
        </td>
      </tr>
    {% endfor %}
    </tbody>
  </table>
  </div>
  {% else %}{{ empty("No provisioning key yet.") }}{% endif %}
</section>
</div>
{% endif %}
{% endblock %}
"""

UNIT = """\
{% extends "base.html" %}
{% from "_macros.html" import page_head, csrf, empty, state with context %}
{% block content %}
{% set operator = user.role in ("operator", "admin") %}
{% call page_head("Gate " ~ unit.controller_id,
                  "hardware id " ~ unit.hardware_id ~ " · firmware " ~ unit.firmware_version) %}
  {{ state(unit.online, "online", "offline") }}
{% endcall %}
<div class="grid-2">
<section class="card">
  <h2>Unit</h2>
  <dl class="kv">
    <dt>Last seen</dt><dd title="{{ unit.last_seen|time }}">{{ unit.last_seen|ago }}</dd>
    <dt>Online since</dt><dd>{{ unit.online_since|time }}</dd>
    <dt>Registered</dt><dd>{{ unit.registered_at|time }}</dd>
    <dt>Credentials rotated</dt><dd>{{ unit.credentials_rotated_at|time }}</dd>
    <dt>Publishes to</dt><dd><code>{{ unit.topics.publish }}</code></dd>
    <dt>Subscribes to</dt><dd><code>{{ unit.topics.subscribe }}</code></dd>
  </dl>
  <h3>Names</h3>
  <ul id="gate-names">
  {% for n in unit.names %}
    <li><code>{{ n.controller_id }}</code>
      <span class="muted small">{{ n.started_at|time }} – {{ n.ended_at|time if n.ended_at else "now" }},
        by {{ n.actor }}</span></li>
  {% endfor %}
  </ul>
  {% if operator %}
  <form method="post" action="/gates/{{ unit.controller_id }}/rename" class="row" id="rename">
    {{ csrf() }}
    <label>New controller id
      <input name="controller_id" required maxlength="64" pattern="[A-Za-z0-9][A-Za-z0-9_.:\\-]*"></label>
    <button class="btn" type="submit">Rename</button>
  </form>
  {% endif %}
  {% if user.role == "admin" %}
  <form method="post" action="/gates/{{ unit.controller_id }}/delete" class="inline"
        data-confirm="Delete {{ unit.controller_id }}, its broker account and its history?">
    {{ csrf() }}<button class="btn small danger" type="submit">Delete unit</button>
  </form>
  {% endif %}
</section>
<section class="card">
  <h2>Last status</h2>
  {% if unit.last_status %}<pre class="json">{{ unit.last_status|tojson(indent=2) }}</pre>
  {% else %}{{ empty("No status yet.") }}{% endif %}
  {% if status["items"] %}
  <details><summary>Recent history ({{ status.total }})</summary>
    <ul>{% for s in status["items"] %}
      <li><span class="muted small">{{ s.time|time }}</span> <code>{{ s.status|tojson }}</code></li>
    {% endfor %}</ul>
  </details>
  {% endif %}
</section>
</div>
<section class="card">
  <h2>Commands</h2>
  {% if operator %}
  <form method="post" action="/gates/{{ unit.controller_id }}/commands" class="row" id="send-command">
    {{ csrf() }}
    <label>Command<input name="command" required maxlength="32" list="gate-commands" placeholder="open"></label>
    <datalist id="gate-commands">
      {% for c in ("open", "close", "stop", "status", "configure", "get_logs", "reboot") %}
      <option>{{ c }}</option>
      {% endfor %}
    </datalist>
    <label>Arguments (JSON)<input name="args" placeholder="{}"></label>
    <button class="btn primary" type="submit">Send</button>
  </form>
  {% endif %}
  {% if commands["items"] %}
  <div class="table-wrap">
  <table id="gate-commands-table">
    <thead><tr><th>Sent</th><th>Command</th><th>By</th><th>State</th><th>Result</th></tr></thead>
    <tbody>
    {% for c in commands["items"] %}
      <tr>
        <td class="nowrap">{{ c.created_at|time }}</td>
        <td><code>{{ c.command }}</code> <span class="muted small">{{ c.id[:8] }}</span></td>
        <td>{{ c.actor }} <span class="muted small">({{ c.via }})</span></td>
        <td><span class="pill {{ {'succeeded': 'ok', 'pending': 'muted'}.get(c.state, 'bad') }}">
          {{- c.state }}</span></td>
        <td>{% if c.error %}{{ c.error }}
          {% elif c.result is not none %}<code>{{ c.result|tojson }}</code>{% endif %}</td>
      </tr>
    {% endfor %}
    </tbody>
  </table>
  </div>
  {% else %}{{ empty("No command sent yet.") }}{% endif %}
</section>
{% if access is not none %}
<div class="grid-2">
<section class="card">
  <h2>App access</h2>
  {% if access["items"] %}
  <div class="table-wrap">
  <table id="gate-access">
    <thead><tr>
      <th>App</th><th>Level</th><th>Via</th><th>Last used</th><th>State</th><th class="right">Actions</th>
    </tr></thead>
    <tbody>
    {% for a in access["items"] %}
      <tr>
        <td><code>{{ a.fingerprint }}</code></td><td>{{ a.access_level }}</td><td>{{ a.via }}</td>
        <td>{{ a.last_used_at|ago }}</td>
        <td><span class="pill {{ 'ok' if a.state == 'active' else 'muted' }}">{{ a.state }}</span></td>
        <td class="actions">{% if a.state == "active" %}
          <form method="post" action="/gates/{{ unit.controller_id }}/user-tokens/{{ a.id }}/revoke" class="inline">
            {{ csrf() }}<button class="btn small danger" type="submit">Revoke</button>
          </form>{% endif %}</td>
      </tr>
    {% endfor %}
    </tbody>
  </table>
  </div>
  {% else %}{{ empty("No app has access. Units report app tokens captured over BLE pairing.") }}{% endif %}
</section>
<section class="card">
  <h2>Sharing tokens</h2>
  <form method="post" action="/gates/{{ unit.controller_id }}/shares" class="row" id="new-share">
    {{ csrf() }}
    <label>Level<select name="access_level">{% for l in levels %}<option>{{ l }}</option>{% endfor %}</select></label>
    <label>Expires in (hours)<input name="expires_in_hours" type="number" min="1" value="24"></label>
    <button class="btn" type="submit">Create token</button>
  </form>
  {% if shares["items"] %}
  <div class="table-wrap">
  <table id="gate-shares">
    <thead><tr>
      <th>Token</th><th>Level</th><th>By</th><th>Expires</th><th>State</th><th class="right">Actions</th>
    </tr></thead>
    <tbody>
    {% for s in shares["items"] %}
      <tr>
        <td><code>{{ s.prefix }}…</code></td><td>{{ s.access_level }}</td><td>{{ s.created_by }}</td>
        <td class="nowrap">{{ s.expires_at|time }}</td>
        <td><span class="pill {{ 'ok' if s.state == 'active' else 'muted' }}">{{ s.state }}</span>
          {% if s.used_by %}<span class="muted small">by {{ s.used_by }}, {{ s.used_at|time }}</span>{% endif %}</td>
        <td class="actions">{% if s.state == "active" %}
          <form method="post" action="/gates/{{ unit.controller_id }}/shares/{{ s.id }}/revoke" class="inline">
            {{ csrf() }}<button class="btn small danger" type="submit">Revoke</button>
          </form>{% endif %}</td>
      </tr>
    {% endfor %}
    </tbody>
  </table>
  </div>
  {% else %}{{ empty("No sharing token.") }}{% endif %}
</section>
</div>
{% endif %}
<section class="card">
  <h2>Files</h2>
  {% if operator %}
  <form method="post" action="/gates/{{ unit.controller_id }}/config" enctype="multipart/form-data" class="row"
        id="push-config">
    {{ csrf() }}
    <label>Config file<input type="file" name="file" required></label>
    <label>Name<input name="name" value="config" maxlength="128"></label>
    <button class="btn" type="submit">Push to the unit</button>
  </form>
  {% endif %}
  {% if files["items"] %}
  <div class="table-wrap">
  <table id="gate-files">
    <thead><tr><th>Name</th><th>Kind</th><th>Direction</th><th>Size</th><th>Created</th><th>State</th></tr></thead>
    <tbody>
    {% for f in files["items"] %}
      <tr>
        <td>{% if operator and f.stored_at %}<a href="/gates/{{ unit.controller_id }}/files/{{ f.id }}">{{ f.name }}</a>
          {%- else %}{{ f.name }}{% endif %}</td>
        <td>{{ f.kind }}</td><td>{{ "from the unit" if f.direction == "up" else "to the unit" }}</td>
        <td>{{ f.size if f.size is not none else "≤ " ~ f.max_size }}</td>
        <td class="nowrap">{{ f.created_at|time }}</td><td>{{ f.state }}</td>
      </tr>
    {% endfor %}
    </tbody>
  </table>
  </div>
  {% else %}{{ empty("No file yet.") }}{% endif %}
</section>
{% endblock %}
"""

TEMPLATES = {"gate_units.html": UNITS, "gate_unit.html": UNIT}
