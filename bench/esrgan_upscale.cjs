// The peer of bench/quality.sh: UpscalerJS ESRGAN-thick x4 on tfjs's wasm backend, offline, under node 20.
//
// Usage: NODE_PATH=<npm folder>/node_modules node bench/esrgan_upscale.cjs OUT_DIR LR.png...
// Writes OUT_DIR/<stem>.png (8-bit RGB, 4x the input) for each input and prints one JSON line per image
// ({"name", "seconds"}: the upscale itself, model load and warm-up excluded).
//
// upscaler's node entry point requires @tensorflow/tfjs-node, which cannot install here (it downloads a
// prebuilt libtensorflow). This script hands it @tensorflow/tfjs with the wasm backend instead, and loads the
// model's file:// path through a small load router. Inputs and outputs are tensors (pngjs decodes and encodes),
// so none of tfjs-node's image functions are needed.
'use strict';

const fs = require('fs');
const path = require('path');
const Module = require('module');

const tf = require('@tensorflow/tfjs');
require('@tensorflow/tfjs-backend-wasm');

// upscaler/node asks for tfjs-node: give it tfjs (same API for what upscaler uses with tensor inputs).
const origLoad = Module._load;
Module._load = function load(request, parent, isMain) {
  if (request === '@tensorflow/tfjs-node') return tf;
  return origLoad.call(this, request, parent, isMain);
};

// file:// model URLs: model.json and its weight shards from disk.
tf.io.registerLoadRouter((url) => {
  if (typeof url !== 'string' || !url.startsWith('file://')) return null;
  const jsonPath = url.slice('file://'.length);
  return {
    load: async () => {
      const json = JSON.parse(fs.readFileSync(jsonPath, 'utf8'));
      const dir = path.dirname(jsonPath);
      const specs = [];
      const buffers = [];
      for (const group of json.weightsManifest) {
        specs.push(...group.weights);
        for (const p of group.paths) buffers.push(fs.readFileSync(path.join(dir, p)));
      }
      const all = Buffer.concat(buffers);
      return {
        modelTopology: json.modelTopology,
        format: json.format,
        generatedBy: json.generatedBy,
        convertedBy: json.convertedBy,
        weightSpecs: specs,
        weightData: all.buffer.slice(all.byteOffset, all.byteOffset + all.byteLength),
      };
    },
  };
});

const { PNG } = require('pngjs');

function readRgb(file) {
  const png = PNG.sync.read(fs.readFileSync(file));
  const { width, height, data } = png; // RGBA 8-bit
  const rgb = new Int32Array(width * height * 3);
  for (let i = 0, j = 0; i < width * height; i += 1, j += 3) {
    rgb[j] = data[4 * i];
    rgb[j + 1] = data[4 * i + 1];
    rgb[j + 2] = data[4 * i + 2];
  }
  return tf.tensor3d(rgb, [height, width, 3], 'int32');
}

function writeRgb(file, tensor) {
  const [height, width] = tensor.shape;
  // Rounded to nearest and clamped to 0..255, as infdit writes its 8-bit samples.
  const vals = tf.tidy(() => tensor.round().clipByValue(0, 255)).dataSync();
  const png = new PNG({ width, height });
  for (let i = 0; i < width * height; i += 1) {
    png.data[4 * i] = vals[3 * i];
    png.data[4 * i + 1] = vals[3 * i + 1];
    png.data[4 * i + 2] = vals[3 * i + 2];
    png.data[4 * i + 3] = 255;
  }
  const tmp = `${file}.partial`;
  fs.writeFileSync(tmp, PNG.sync.write(png));
  fs.renameSync(tmp, file);
}

async function main() {
  const [outDir, ...inputs] = process.argv.slice(2);
  if (!outDir || inputs.length === 0) {
    process.stderr.write('usage: node bench/esrgan_upscale.cjs OUT_DIR LR.png...\n');
    process.exit(2);
  }
  fs.mkdirSync(outDir, { recursive: true });
  await tf.setBackend('wasm');
  await tf.ready();
  const Upscaler = require('upscaler/node');
  const x4 = require('@upscalerjs/esrgan-thick/4x');
  const upscaler = new Upscaler({ model: x4 });
  await upscaler.getModel();
  for (const file of inputs) {
    const input = readRgb(file);
    const t0 = process.hrtime.bigint();
    // The whole 256 x 256 image in one pass (UpscalerJS's default: no patchSize), so no patch seams.
    const out = await upscaler.execute(input, { output: 'tensor' });
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    const stem = path.basename(file).replace(/\.png$/i, '');
    writeRgb(path.join(outDir, `${stem}.png`), out);
    input.dispose();
    out.dispose();
    process.stdout.write(`${JSON.stringify({ name: stem, seconds, backend: tf.getBackend() })}\n`);
  }
}

main().catch((e) => {
  process.stderr.write(`error: ${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});
