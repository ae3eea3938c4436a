// comfyui-wan22 graph-editor extension.
//
// - Model loader: shows the variant detected from the chosen file (asked from the server's
//   /wan22/model_info route, which reads tensor names and shapes, no weights), or the server's
//   short reason why the file cannot be used.
// - MoE sampler: shows at which step the high-noise expert hands off to the low-noise one for
//   the current steps / shift / boundary / solver / denoise, or split = steps (schedule.js, the
//   same computation as wan_core's sampler; tests/test_nodes_web.py checks they agree).
// - Video latent: flags a width, height or length the connected model cannot take.
//
// The text lives in a read-only widget (INFO_WIDGET) that draws itself: the classic canvas calls
// its draw(), and the Vue node renderer ("Nodes 2.0") shows such widgets through its legacy
// widget canvas, so both renderings show it. It is never saved in the workflow nor sent with a
// prompt. A timer keeps every pack node's text current (widget edits, new links, answers from the
// server), wraps it to the node's width and sizes the node to it. A failed lookup is asked
// again after RETRY_MS (the file may have been added) and every lookup after Refresh.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { handoff, sizeProblems } from "./schedule.js";

const EXTENSION = "comfyui-wan22";
const LOADER = "W22ModelLoader";
const LORA = "W22LoRA";
const SAMPLER = "W22MoESampler";
const LATENT = "W22VideoLatent";
const INFO_WIDGET = "wan22_info";
const LINE_HEIGHT = 16;
const FONT = "12px sans-serif";
const PADDING = 10;
const UPDATE_MS = 400;
const RETRY_MS = 4000;
const COLORS = { info: "#9bd", warn: "#fc6", error: "#f77" };

// model file name -> { promise, info, failedAt }: an answer (or a pending ask) per file
const modelInfo = new Map();

async function askModelInfo(name) {
  try {
    const resp = await api.fetchApi(`/wan22/model_info?name=${encodeURIComponent(name)}`);
    let body = null;
    try {
      body = await resp.json();
    } catch {
      body = null;
    }
    if (resp.ok && body && !body.error) return body;
    return { error: body?.error || `the server could not read this model (HTTP ${resp.status})` };
  } catch {
    return { error: "the server did not answer; is ComfyUI still running?" };
  }
}

// The server's facts for a model file: an info object, { error }, or null while asking.
function modelInfoFor(name) {
  if (!name) return null;
  let entry = modelInfo.get(name);
  const stale = entry?.info?.error && Date.now() - entry.failedAt > RETRY_MS;
  if (!entry || stale) {
    entry = { info: entry?.info ?? null, failedAt: 0 };
    modelInfo.set(name, entry);
    entry.promise = askModelInfo(name).then((info) => {
      entry.info = info;
      entry.failedAt = info.error ? Date.now() : 0;
    });
  }
  return entry.info;
}

function widgetValue(node, name) {
  const widget = node.widgets?.find((w) => w.name === name);
  return widget ? widget.value : undefined;
}

// The model loader feeding `inputName` of `node`, if that input is connected to one (through
// any chain of Wan2.2 LoRA nodes, which pass the model on).
function loaderOf(node, inputName) {
  let slot = node.findInputSlot(inputName);
  let origin = slot >= 0 ? node.getInputNode(slot) : null;
  while (origin && origin.type === LORA) {
    slot = origin.findInputSlot("model");
    origin = slot >= 0 ? origin.getInputNode(slot) : null;
  }
  return origin && origin.type === LOADER ? origin : null;
}

function connected(node, inputName) {
  const slot = node.findInputSlot(inputName);
  return slot >= 0 && node.inputs[slot].link != null;
}

function infoOf(loader) {
  return loader ? modelInfoFor(widgetValue(loader, "model_name")) : null;
}

function loaderLines(node) {
  if (!widgetValue(node, "model_name")) return [["warn", "no model file: put one in models/diffusion_models, then Refresh"]];
  const info = infoOf(node);
  if (!info) return [["info", "reading the model file..."]];
  if (info.error) return [["error", info.error]];
  const lines = [["info", `detected: ${info.task} (${info.model_type})`]];
  if (info.boundary != null) {
    lines.push(["info", `MoE expert: boundary ${info.boundary}, shift ${info.sample_shift}`]);
  }
  return lines;
}

// The MoE hand-off the sampler's settings give: which expert runs which steps.
function handoffLines(node, info) {
  const boundarySetting = widgetValue(node, "boundary");
  const boundary = boundarySetting > 0 ? boundarySetting : info.boundary;
  const steps = widgetValue(node, "steps");
  if (boundary == null) return [["info", `${info.task}: one model runs all ${steps} steps`]];
  // the hand-off follows the sampler's split rule: the boundary, or a fixed number of first steps
  const byStepCount = widgetValue(node, "split") === "steps";
  const highNoiseSteps = byStepCount ? widgetValue(node, "high_noise_steps") : null;
  const plan = handoff({
    steps, shift: widgetValue(node, "shift"), boundary, highNoiseSteps,
    solver: widgetValue(node, "solver"), denoise: widgetValue(node, "denoise"),
  });
  const rule = byStepCount ? `split: first ${highNoiseSteps} steps` : `boundary ${boundary}`;
  const lines = [];
  if (byStepCount && highNoiseSteps > plan.steps) {
    lines.push(["error", `high_noise_steps ${highNoiseSteps} is more than the ${plan.steps} steps`]);
  }
  if (plan.highSteps === 0) {
    lines.push(["info", `low-noise expert runs all ${plan.steps} steps (${rule})`]);
  } else if (plan.highSteps === plan.steps) {
    lines.push(["info", `high-noise expert runs all ${plan.steps} steps (${rule})`]);
  } else {
    lines.push(["info", `hand-off after step ${plan.highSteps} of ${plan.steps}: ` +
      `high-noise 1-${plan.highSteps}, low-noise ${plan.highSteps + 1}-${plan.steps}`]);
  }
  if (plan.highSteps < plan.steps && !connected(node, "low_noise_model") && info.boundary != null) {
    lines.push(["warn", "no low-noise model connected: the high-noise one runs every step"]);
  }
  return lines;
}

function samplerLines(node) {
  const loader = loaderOf(node, "high_noise_model");
  if (!loader) return [["info", "connect a Wan2.2 Model Loader to see the hand-off step"]];
  const info = infoOf(loader);
  if (!info) return [["info", "reading the model file..."]];
  if (info.error) return [["warn", "the high-noise model cannot be read: see its loader"]];
  return handoffLines(node, info);
}

function latentLines(node) {
  const info = infoOf(loaderOf(node, "model"));
  if (!info || info.error) return [];
  return sizeProblems(info, {
    width: widgetValue(node, "width"),
    height: widgetValue(node, "height"),
    length: widgetValue(node, "length"),
  });
}

const LINES = { [LOADER]: loaderLines, [SAMPLER]: samplerLines, [LATENT]: latentLines };

// --- the read-only text widget ------------------------------------------------------------------

let measureContext = null;

function textWidth(text) {
  measureContext ??= document.createElement("canvas").getContext("2d");
  measureContext.font = FONT;
  return measureContext.measureText(text).width;
}

// [level, text] lines broken at spaces to fit `width` pixels.
function wrap(lines, width) {
  const out = [];
  for (const [level, text] of lines) {
    let current = "";
    for (const word of text.split(" ")) {
      const candidate = current ? `${current} ${word}` : word;
      if (current && textWidth(candidate) > width) {
        out.push([level, current]);
        current = word;
      } else {
        current = candidate;
      }
    }
    out.push([level, current]);
  }
  return out;
}

function makeInfoWidget() {
  return {
    name: INFO_WIDGET,
    type: INFO_WIDGET,
    value: "",
    serialize: false, // not in the workflow's widgets_values
    options: { serialize: false }, // not in the prompt
    wrapped: [],
    draw(ctx, node, width, y) {
      ctx.save();
      ctx.font = FONT;
      ctx.textAlign = "left";
      ctx.textBaseline = "alphabetic";
      this.wrapped.forEach(([level, text], i) => {
        ctx.fillStyle = COLORS[level] ?? COLORS.info;
        ctx.fillText(text, PADDING, y + (i + 1) * LINE_HEIGHT - 3);
      });
      ctx.restore();
    },
    computeSize(width) {
      return [width ?? 0, this.wrapped.length ? this.wrapped.length * LINE_HEIGHT + 4 : 0];
    },
    mouse() {
      return false;
    },
  };
}

function infoWidget(node) {
  let widget = node.widgets?.find((w) => w.name === INFO_WIDGET);
  if (!widget) {
    widget = makeInfoWidget();
    if (node.addCustomWidget) node.addCustomWidget(widget);
    else (node.widgets ??= []).push(widget);
  }
  return widget;
}

// Recompute a node's lines; when they change, show them and fit the node's height to them.
function update(node) {
  const lines = LINES[node.type];
  if (!lines || node.flags?.collapsed) return;
  const shown = lines(node);
  node.wan22Lines = shown.map(([, text]) => text); // what is shown, for tests and debugging
  const widget = infoWidget(node);
  const wrapped = wrap(shown, Math.max(60, node.size[0] - 2 * PADDING));
  const key = JSON.stringify(wrapped);
  if (widget.value === key) return;
  widget.value = key;
  widget.wrapped = wrapped;
  // the Vue renderer sizes a drawn widget by computedHeight, which only the canvas layout sets
  widget.computedHeight = widget.computeSize(node.size[0])[1];
  node.setSize([node.size[0], node.computeSize()[1]]);
  widget.triggerDraw?.();
  node.setDirtyCanvas?.(true, true);
}

function updateAll() {
  const nodes = app.graph?._nodes ?? app.graph?.nodes ?? [];
  for (const node of nodes) {
    if (node.type in LINES) update(node);
  }
}

app.registerExtension({
  name: `${EXTENSION}.wan22`,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!(nodeData.name in LINES)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      infoWidget(this);
      return result;
    };
  },
  async refreshComboInNodes() {
    modelInfo.clear(); // Refresh: files may have been added, replaced or removed
    updateAll();
  },
  setup() {
    setInterval(updateAll, UPDATE_MS);
    console.log(`[${EXTENSION}] web extension loaded`);
  },
});
