// comfyui-wan22 graph-editor extension.
//
// - Model loader: shows the variant detected from the chosen file (asked from the server's
//   /wan22/model_info route, which reads tensor names and shapes, no weights).
// - MoE sampler: shows at which step the high-noise expert hands off to the low-noise one for
//   the current steps / shift / boundary / solver / denoise, or split = steps (schedule.js, the
//   same computation as wan_core's sampler; tests/test_nodes_web.py checks they agree).
// - Video latent: flags a width, height or length the connected model cannot take.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { handoff, sizeProblems } from "./schedule.js";

const EXTENSION = "comfyui-wan22";
const LOADER = "W22ModelLoader";
const LORA = "W22LoRA";
const SAMPLER = "W22MoESampler";
const LATENT = "W22VideoLatent";
const LINE_HEIGHT = 16;
const COLORS = { info: "#9bd", warn: "#fc6", error: "#f77" };

const modelInfo = new Map(); // model file name -> Promise of the server's answer

function fetchModelInfo(name) {
  if (!name) return Promise.resolve(null);
  if (!modelInfo.has(name)) {
    const url = `/wan22/model_info?name=${encodeURIComponent(name)}`;
    modelInfo.set(name, api.fetchApi(url).then(async (resp) => {
      const body = await resp.json();
      return resp.ok ? body : { error: body.error || resp.statusText };
    }).catch((err) => ({ error: String(err) })));
  }
  return modelInfo.get(name);
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

// Ask for the loader's model facts; repaint when they arrive.
function infoOf(loader) {
  if (!loader) return null;
  const name = widgetValue(loader, "model_name");
  if (loader.wan22Name !== name) {
    loader.wan22Name = name;
    loader.wan22Info = null;
    fetchModelInfo(name).then((info) => {
      if (loader.wan22Name === name) {
        loader.wan22Info = info;
        app.graph.setDirtyCanvas(true, true);
      }
    });
  }
  return loader.wan22Info;
}

function loaderLines(node) {
  const info = infoOf(node);
  if (!info) return [];
  if (info.error) return [[COLORS.error, info.error]];
  const lines = [[COLORS.info, `detected: ${info.task} (${info.model_type})`]];
  if (info.boundary != null) {
    lines.push([COLORS.info, `MoE expert: boundary ${info.boundary}, shift ${info.sample_shift}`]);
  }
  return lines;
}

function samplerLines(node) {
  const info = infoOf(loaderOf(node, "high_noise_model"));
  const boundarySetting = widgetValue(node, "boundary");
  const boundary = boundarySetting > 0 ? boundarySetting : info?.boundary;
  const steps = widgetValue(node, "steps");
  if (boundary == null) {
    if (!info) return [[COLORS.info, "connect a Wan2.2 model loader to see the hand-off step"]];
    return [[COLORS.info, `${info.task}: one model runs all ${steps} steps`]];
  }
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
    lines.push([COLORS.error, `high_noise_steps ${highNoiseSteps} is more than the ${plan.steps} steps`]);
  }
  if (plan.highSteps === 0) {
    lines.push([COLORS.info, `low-noise expert runs all ${plan.steps} steps (${rule})`]);
  } else if (plan.highSteps === plan.steps) {
    lines.push([COLORS.info, `high-noise expert runs all ${plan.steps} steps (${rule})`]);
  } else {
    lines.push([COLORS.info, `hand-off after step ${plan.highSteps} of ${plan.steps}: ` +
      `high-noise 1-${plan.highSteps}, low-noise ${plan.highSteps + 1}-${plan.steps}`]);
  }
  if (plan.highSteps < plan.steps && !connected(node, "low_noise_model") && info?.boundary != null) {
    lines.push([COLORS.warn, "no low-noise model connected: the high-noise one runs every step"]);
  }
  return lines;
}

function latentLines(node) {
  const info = infoOf(loaderOf(node, "model"));
  if (!info || info.error) return [];
  return sizeProblems(info, {
    width: widgetValue(node, "width"),
    height: widgetValue(node, "height"),
    length: widgetValue(node, "length"),
  }).map(([level, text]) => [COLORS[level], text]);
}

const LINES = { [LOADER]: loaderLines, [SAMPLER]: samplerLines, [LATENT]: latentLines };

app.registerExtension({
  name: `${EXTENSION}.wan22`,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const lines = LINES[nodeData.name];
    if (!lines) return;
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = onDrawForeground?.apply(this, arguments);
      if (this.flags?.collapsed) return result;
      const shown = lines(this);
      this.wan22Lines = shown.map(([, text]) => text); // what is shown, for tests and debugging
      const needed = this.computeSize()[1] + shown.length * LINE_HEIGHT;
      if (this.size[1] < needed) this.setSize([this.size[0], needed]);
      ctx.save();
      ctx.font = "12px sans-serif";
      ctx.textAlign = "left";
      shown.forEach(([color, text], i) => {
        ctx.fillStyle = color;
        ctx.fillText(text, 10, this.size[1] - (shown.length - i) * LINE_HEIGHT + 12);
      });
      ctx.restore();
      return result;
    };
  },
  setup() {
    console.log(`[${EXTENSION}] web extension loaded`);
  },
});
