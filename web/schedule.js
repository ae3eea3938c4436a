// The sampling schedule and the video-size rules, for display in the graph editor.
// Plain functions, no browser APIs: tests/test_nodes_web.py runs them under node and checks
// that they agree with wan_core (the backend) on a grid of values.
//
// The schedule (the reference's, as wan_core.sampling computes it; 1000 training timesteps):
//   unipc:         sigma_i = linspace(sigma_max, 0, n + 1)[i], i < n, with sigma_max = 0.999
//                  rounded to float32 (the top of the reference scheduler's training table)
//   dpm++ / euler: sigma_i = linspace(1, 0, n + 1)[i], i < n
//   shifted:       s' = shift * s / (1 + (shift - 1) * s)
//   timestep:      t_i = trunc(1000 * s'_i)  (an int64 cast); euler keeps 1000 * s'_i unrounded
// linspace(a, b, m)[i] = i * ((b - a) / (m - 1)) + a, evaluated in float64 like numpy.
// With denoise < 1 the schedule is built for n = floor(steps / denoise) steps and the last
// `steps` of them are run. The high-noise expert runs the steps whose t_i >= 1000 * boundary.

const NUM_TRAIN_TIMESTEPS = 1000;
const SIGMA_MAX = Math.fround(1 - 1 / NUM_TRAIN_TIMESTEPS);

function linspace(start, stop, num) {
  const step = (stop - start) / (num - 1);
  const out = [];
  for (let i = 0; i < num; i++) out.push(i * step + start);
  out[num - 1] = stop;
  return out;
}

export function timesteps({ steps, shift, solver = "unipc", denoise = 1.0 }) {
  const total = denoise < 1 ? Math.floor(steps / denoise) : steps;
  const top = solver === "unipc" ? SIGMA_MAX : 1.0;
  const round = solver === "euler" ? (t) => t : Math.trunc;
  const sigmas = linspace(top, 0, total + 1).slice(0, total);
  const ts = sigmas.map((s) => round((shift * s) / (1 + (shift - 1) * s) * NUM_TRAIN_TIMESTEPS));
  return ts.slice(total - steps);
}

// How many of the steps run on the high-noise expert (they come first): those with
// t >= 1000 * boundary, or with the sampler's split = "steps" the first highNoiseSteps.
export function handoff({ steps, shift, boundary, solver = "unipc", denoise = 1.0, highNoiseSteps = null }) {
  const ts = timesteps({ steps, shift, solver, denoise });
  const threshold = boundary * NUM_TRAIN_TIMESTEPS;
  const highSteps = highNoiseSteps == null ? ts.filter((t) => t >= threshold).length
    : Math.min(highNoiseSteps, ts.length);
  return { steps: ts.length, highSteps, timesteps: ts };
}

// Problems with a video size for a model: [level, message] pairs, level "error" for sizes the
// model cannot take and "warn" for sizes it was not trained at. `info` is the server's
// /wan22/model_info answer (size_multiple, size_is_area, frame_stride, supported_sizes). When
// size_is_area (I2V), width x height only sets the area and the image sets the aspect ratio,
// so any width and height can be taken.
export function sizeProblems(info, { width, height, length }) {
  const problems = [];
  const m = info.size_multiple;
  if (!info.size_is_area && (width % m !== 0 || height % m !== 0)) {
    problems.push(["error", `${info.task}: width and height must be multiples of ${m} (got ${width}x${height})`]);
  }
  if ((length - 1) % info.frame_stride !== 0) {
    problems.push(["error", `${info.task}: length must be ${info.frame_stride}k+1 frames (got ${length})`]);
  }
  const trained = info.supported_sizes.some(([w, h]) => w === width && h === height);
  if (problems.length === 0 && !trained) {
    const sizes = info.supported_sizes.map(([w, h]) => `${w}x${h}`).join(", ");
    problems.push(["warn", `${info.task} was trained at ${sizes}`]);
  }
  return problems;
}
