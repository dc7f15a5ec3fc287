// A sortable, filterable, paginated table (only one page of rows is in the DOM, so 200 or
// 20,000 parameter tensors cost the same to show).

/**
 * new DataTable(container, {columns, key, pageSize, onSelect})
 *   columns: [{key, label, numeric, format(value, row), cell(td, value, row), title}]
 *   key: the row field that identifies a row (and is matched by the filter)
 *   table.setRows(rows) / table.filter = "text" / table.sortBy(key) / table.select(id)
 */
export class DataTable {
  constructor(container, { columns, key = "name", pageSize = 50, onSelect = null, label = "" }) {
    this.columns = columns;
    this.key = key;
    this.pageSize = pageSize;
    this.onSelect = onSelect;
    this.rows = [];
    this.filterText = "";
    this.sortKey = key;
    this.sortDir = 1;
    this.page = 0;
    this.selected = null;

    this.table = document.createElement("table");
    this.table.className = "data";
    if (label) this.table.setAttribute("aria-label", label);
    const head = this.table.createTHead().insertRow();
    this.headers = new Map();
    for (const col of columns) {
      const th = document.createElement("th");
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = col.label;
      if (col.title) button.title = col.title;
      button.dataset.sort = col.key;
      button.addEventListener("click", () => this.sortBy(col.key));
      th.append(button);
      if (col.numeric) th.className = "num";
      head.append(th);
      this.headers.set(col.key, th);
    }
    this.body = this.table.createTBody();
    this.body.addEventListener("click", (e) => {
      const tr = e.target.closest("tr");
      if (tr && tr.dataset.id !== undefined) this.select(tr.dataset.id, true);
    });

    this.pager = document.createElement("div");
    this.pager.className = "pager";
    this.prev = document.createElement("button");
    this.prev.type = "button";
    this.prev.textContent = "‹ prev";
    this.prev.dataset.role = "prev";
    this.prev.addEventListener("click", () => this.goto(this.page - 1));
    this.next = document.createElement("button");
    this.next.type = "button";
    this.next.textContent = "next ›";
    this.next.dataset.role = "next";
    this.next.addEventListener("click", () => this.goto(this.page + 1));
    this.info = document.createElement("span");
    this.info.className = "muted";
    this.pager.append(this.prev, this.info, this.next);
    container.replaceChildren(this.table, this.pager);
  }

  setRows(rows) {
    this.rows = rows;
    this.render();
  }

  set filter(text) {
    this.filterText = text.trim().toLowerCase();
    this.page = 0;
    this.render();
  }

  sortBy(key) {
    if (this.sortKey === key) this.sortDir = -this.sortDir;
    else { this.sortKey = key; this.sortDir = 1; }
    this.render();
  }

  goto(page) {
    this.page = page;
    this.render();
  }

  select(id, fromUser = false) {
    this.selected = id;
    for (const tr of this.body.rows) tr.classList.toggle("selected", tr.dataset.id === id);
    if (fromUser && this.onSelect) this.onSelect(id);
  }

  /** The rows that pass the filter, in display order. */
  visibleRows() {
    const f = this.filterText;
    const rows = f ? this.rows.filter((r) => String(r[this.key]).toLowerCase().includes(f))
                   : this.rows.slice();
    const k = this.sortKey;
    const dir = this.sortDir;
    const col = this.columns.find((c) => c.key === k);
    const value = col && col.sortValue ? col.sortValue : (r) => r[k];
    rows.sort((a, b) => {
      const va = value(a);
      const vb = value(b);
      // missing and NaN values sort last whatever the direction
      const ma = va === undefined || va === null || Number.isNaN(va);
      const mb = vb === undefined || vb === null || Number.isNaN(vb);
      if (ma || mb) return ma === mb ? 0 : ma ? 1 : -1;
      if (typeof va === "number" && typeof vb === "number") return (va - vb) * dir;
      return String(va).localeCompare(String(vb), undefined, { numeric: true }) * dir;
    });
    return rows;
  }

  render() {
    const rows = this.visibleRows();
    const pages = Math.max(1, Math.ceil(rows.length / this.pageSize));
    this.page = Math.min(Math.max(0, this.page), pages - 1);
    const start = this.page * this.pageSize;
    const shown = rows.slice(start, start + this.pageSize);
    const fragment = document.createDocumentFragment();
    for (const row of shown) {
      const tr = document.createElement("tr");
      const id = String(row[this.key]);
      tr.dataset.id = id;
      if (id === this.selected) tr.className = "selected";
      for (const col of this.columns) {
        const td = tr.insertCell();
        const v = row[col.key];
        if (col.numeric) td.className = "num";
        if (col.cell) col.cell(td, v, row);
        else if (v === undefined || v === null) td.textContent = "";
        else td.textContent = col.format ? col.format(v, row) : String(v);
      }
      fragment.append(tr);
    }
    this.body.replaceChildren(fragment);
    for (const [k, th] of this.headers) {
      th.setAttribute("aria-sort", k !== this.sortKey ? "none" : this.sortDir > 0 ? "ascending" : "descending");
    }
    this.prev.disabled = this.page === 0;
    this.next.disabled = this.page >= pages - 1;
    this.info.textContent = rows.length
      ? `${start + 1}–${start + shown.length} of ${rows.length}` +
        (rows.length !== this.rows.length ? ` (filtered from ${this.rows.length})` : "")
      : this.rows.length ? "no match" : "none";
    this.pager.hidden = rows.length <= this.pageSize && this.page === 0;
  }
}
