// The steering-stack editor: an ordered list of entries, one small form per type.
// Each entry is {type, values}; toWire() turns it into the JSON the server takes,
// leaving out optional fields that are empty so the server's defaults apply.

/** Field kinds: range (slider + number), number (one number, left out when empty),
 * select, multi, list (comma-separated numbers), json, check. `choices` names a picker list filled from the server. */
export const TYPES = {
  ngram: { label: "n-gram prior", fields: [
    { name: "prior", kind: "select", choices: "priors" },
    { name: "lambda", kind: "range", min: 0, max: 1, step: 0.01, value: 0.3 },
    { name: "scale", kind: "select", options: ["raw", "zscore"], value: "raw" },
    { name: "weights", kind: "list", optional: true, hint: "w1,w2,w3" },
  ] },
  control: { label: "control vector", fields: [
    { name: "vector", kind: "select", choices: "vectors" },
    { name: "alpha", kind: "range", min: -4, max: 4, step: 0.1, value: 1 },
    { name: "layers", kind: "list", optional: true, hint: "e.g. 8,9,10" },
    { name: "positions", kind: "select", options: ["", "all", "prompt", "generated"], optional: true },
    { name: "mode", kind: "select", options: ["", "add", "ablate", "clamp"], optional: true },
    { name: "preserve_norm", kind: "check", optional: true },
  ] },
  fusion: { label: "fusion", fields: [
    { name: "experts", kind: "multi", choices: "experts" },
    { name: "base", kind: "select", choices: "bases" },
    { name: "mode", kind: "select", options: ["dynamic", "static"], value: "dynamic" },
    { name: "alpha", kind: "list", optional: true, hint: "static: one per expert" },
  ] },
  margin: { label: "margin calibration", fields: [
    { name: "tau", kind: "range", min: 0.01, max: 1, step: 0.01, value: 0.5 },
    { name: "gamma", kind: "range", min: 0, max: 1, step: 0.01, value: 1 },
  ] },
  guard: { label: "guard", fields: [
    { name: "plausibility", kind: "range", min: 0.01, max: 0.99, step: 0.01, value: 0.1 },
    { name: "kl_budget", kind: "range", min: 0.01, max: 2, step: 0.01, value: 0.2 },
    { name: "entropy_scale", kind: "number", optional: true, hint: "nats, e.g. 2 (empty: off)" },
  ] },
  logit_bias: { label: "logit bias", fields: [
    { name: "bias", kind: "json", value: "{}", hint: '{"token id": value}' },
  ] },
};

const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
};

function numbers(text) {
  return text.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
}

export class StackEditor {
  constructor(root, onChange) {
    this.root = root;
    this.onChange = onChange;
    this.entries = [];
    this.choices = { priors: [], vectors: [], experts: [], bases: [] };
  }

  add(type) {
    const values = {};
    for (const f of TYPES[type].fields) {
      if (f.kind === "select" && f.choices) values[f.name] = this.choices[f.choices][0] || "";
      else if (f.kind === "multi") values[f.name] = this.choices[f.choices].slice(0, 1);
      else if (f.kind === "check") values[f.name] = false;
      else values[f.name] = f.value ?? "";
    }
    this.entries.push({ type, values });
    this.render();
  }

  setChoices(choices) {
    Object.assign(this.choices, choices);
    for (const entry of this.entries) {  // fill pickers that were empty before the list came
      for (const f of TYPES[entry.type].fields) {
        if (f.kind === "select" && f.choices && !entry.values[f.name]) {
          entry.values[f.name] = this.choices[f.choices][0] || "";
        }
      }
    }
    this.render();
  }

  /** The stack as wire JSON (a list of entries in order). */
  toWire() {
    return this.entries.map(({ type, values }) => {
      const out = { type };
      for (const f of TYPES[type].fields) {
        const v = values[f.name];
        if (f.kind === "range") out[f.name] = Number(v);
        else if (f.kind === "number") { if (String(v).trim()) out[f.name] = Number(v); }
        else if (f.kind === "list") { if (String(v).trim()) out[f.name] = numbers(String(v)); }
        else if (f.kind === "json") { try { out[f.name] = JSON.parse(v); } catch { out[f.name] = v; } }
        else if (f.kind === "check") { if (v) out[f.name] = true; }
        else if (f.kind === "multi") out[f.name] = v;
        else if (v !== "" || !f.optional) out[f.name] = v;
      }
      return out;
    });
  }

  /** Sweepable request paths of the current stack (its sliders), e.g. steering.0.lambda. */
  sweepPaths() {
    const paths = [];
    this.entries.forEach(({ type }, i) => {
      for (const f of TYPES[type].fields) if (f.kind === "range") paths.push(`steering.${i}.${f.name}`);
    });
    return [...paths, "temperature", "top_p", "seed"];
  }

  render() {
    this.root.replaceChildren(...this.entries.map((entry, i) => this.renderEntry(entry, i)));
    this.onChange();
  }

  renderEntry(entry, i) {
    const move = (d) => {
      const j = i + d;
      if (j < 0 || j >= this.entries.length) return;
      [this.entries[i], this.entries[j]] = [this.entries[j], this.entries[i]];
      this.render();
    };
    const head = el("div", { className: "head" },
      el("b", { textContent: `${i}. ${TYPES[entry.type].label}` }),
      el("button", { textContent: "↑", title: "move up", onclick: () => move(-1) }),
      el("button", { textContent: "↓", title: "move down", onclick: () => move(1) }),
      el("button", { textContent: "✕", title: "remove", className: "remove",
        onclick: () => { this.entries.splice(i, 1); this.render(); } }));
    const box = el("div", { className: "entry" }, head);
    box.dataset.type = entry.type;
    for (const f of TYPES[entry.type].fields) box.append(this.renderField(entry, f));
    return box;
  }

  renderField(entry, f) {
    const set = (v) => { entry.values[f.name] = v; this.onChange(); };
    const value = entry.values[f.name];
    let input;
    if (f.kind === "range") {
      const shown = el("input", { type: "number", className: "val", step: f.step, value });
      const slider = el("input", { type: "range", min: f.min, max: f.max, step: f.step, value });
      slider.oninput = () => { shown.value = slider.value; set(slider.value); };
      shown.oninput = () => { slider.value = shown.value; set(shown.value); };
      shown.name = f.name;
      slider.dataset.field = f.name;
      return el("label", {}, `${f.name} `, slider, shown);
    }
    if (f.kind === "select" || f.kind === "multi") {
      const options = f.choices ? this.choices[f.choices] : f.options;
      input = el("select", { multiple: f.kind === "multi" },
        ...options.map((o) => el("option", { value: o, textContent: o || "(default)" })));
      if (f.choices && !options.length) input.append(el("option", { value: "", textContent: "(none yet)" }));
      if (f.kind === "multi") {
        for (const o of input.options) o.selected = value.includes(o.value);
        input.onchange = () => set([...input.selectedOptions].map((o) => o.value));
      } else {
        input.value = value;
        input.onchange = () => set(input.value);
      }
    } else if (f.kind === "check") {
      input = el("input", { type: "checkbox", checked: value });
      input.onchange = () => set(input.checked);
    } else {
      input = el("input", { value, placeholder: f.hint || "" });
      input.oninput = () => set(input.value);
    }
    input.name = f.name;
    return el("label", {}, `${f.name} `, input);
  }
}
