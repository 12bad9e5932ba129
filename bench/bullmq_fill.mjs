// Bulk writes with BullMQ's own client for bench/bullmq_cost.py, where tests/bullmq_app's `add --n`
// (one awaited Queue.add per job) would take too long for a million jobs. BullMQ comes from the
// node_modules of tests/bullmq_app (installed by tests/bullmq_driver.py's ensure_node_modules()).
//
//   node bullmq_fill.mjs fill --url redis://host:port/db [--prefix bull] --queue Q --n COUNT
//                             [--name ok] [--chunk 1000] [--delay MS]
//       Queue.addBulk of COUNT jobs named NAME (data {}), CHUNK jobs per call; prints COUNT
//   node bullmq_fill.mjs churn --url redis://host:port/db [--prefix bull] --queues Q1,Q2,... --n N
//       prints "ready", then for every line read on stdin: Queue.addBulk of N `ok` jobs spread over
//       the queues, then N jobs taken and completed with BullMQ's manual worker API
//       (Worker.getNextJob + Job.moveToCompleted; no stalled checker runs), and prints "done"
//
// Failures exit non-zero with the error on stderr.

import { createRequire } from 'node:module';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';

const require = createRequire(new URL('../tests/bullmq_app/package.json', import.meta.url));
const { Queue, Worker } = require('bullmq');

function integer(values, name, fallback) {
  const text = values[name];
  if (text === undefined) return fallback;
  if (!/^\d+$/.test(text)) throw new Error(`--${name} must be a whole number, not ${JSON.stringify(text)}`);
  return Number(text);
}

function connection(url) {
  return { url, connectTimeout: 10000, retryStrategy: (times) => (times > 5 ? null : 200 * times) };
}

async function fill(values) {
  const count = integer(values, 'n', 0);
  const chunk = integer(values, 'chunk', 1000);
  const delay = integer(values, 'delay', undefined);
  const name = values.name ?? 'ok';
  const opts = delay === undefined ? {} : { delay };
  const queue = new Queue(values.queue, { connection: connection(values.url), prefix: values.prefix });
  queue.on('error', () => {});
  try {
    await queue.waitUntilReady();
    for (let first = 0; first < count; first += chunk) {
      const jobs = [];
      for (let i = first; i < Math.min(first + chunk, count); i++) jobs.push({ name, data: {}, opts });
      await queue.addBulk(jobs);
    }
  } finally {
    await queue.close();
  }
  process.stdout.write(`${count}\n`);
}

async function churn(values) {
  const names = (values.queues ?? '').split(',').filter(Boolean);
  if (!names.length) throw new Error('--queues is required');
  const perStep = integer(values, 'n', 50);
  const shares = names.map((_, i) => Math.floor(perStep / names.length) + (i < perStep % names.length ? 1 : 0));
  const conn = connection(values.url);
  const queues = names.map((q) => new Queue(q, { connection: conn, prefix: values.prefix }));
  // autorun false: no processing loop and no stalled checker, jobs are taken one by one below
  const workers = names.map((q) => new Worker(q, null, { connection: conn, prefix: values.prefix, autorun: false }));
  for (const x of [...queues, ...workers]) x.on('error', (err) => process.stderr.write(`churn: ${err}\n`));
  try {
    await Promise.all([...queues, ...workers].map((x) => x.waitUntilReady()));
    process.stdout.write('ready\n');
    const lines = createInterface({ input: process.stdin });
    for await (const _ of lines) {
      for (let i = 0; i < names.length; i++) {
        if (!shares[i]) continue;
        await queues[i].addBulk(Array.from({ length: shares[i] }, () => ({ name: 'ok', data: {} })));
        for (let j = 0; j < shares[i]; j++) {
          const token = `churn-${process.pid}-${i}-${j}`;
          const job = await workers[i].getNextJob(token, { block: false });
          if (!job) throw new Error(`queue ${names[i]}: no job to take`);
          await job.moveToCompleted({ ok: true }, token, false);
        }
      }
      process.stdout.write('done\n');
    }
  } finally {
    await Promise.all([...workers, ...queues].map((x) => x.close()));
  }
}

async function main() {
  const { values, positionals } = parseArgs({
    args: process.argv.slice(2),
    allowPositionals: true,
    options: {
      url: { type: 'string' },
      prefix: { type: 'string', default: 'bull' },
      queue: { type: 'string' },
      queues: { type: 'string' },
      name: { type: 'string' },
      n: { type: 'string' },
      chunk: { type: 'string' },
      delay: { type: 'string' },
    },
  });
  if (!values.url) throw new Error('--url is required');
  if (positionals[0] === 'fill') {
    if (!values.queue) throw new Error('--queue is required');
    return fill(values);
  }
  if (positionals[0] === 'churn') return churn(values);
  throw new Error('usage: bullmq_fill.mjs fill|churn --url URL ...');
}

main().then(
  () => {
    process.exitCode = 0;
  },
  (err) => {
    process.stderr.write(`bullmq_fill: ${err && err.stack ? err.stack : err}\n`);
    process.exit(1);
  },
);
