// A real BullMQ program for the exporter's tests (driven by tests/bullmq_driver.py), so the BullMQ
// preset is tested against keys that BullMQ itself writes, never hand-typed ones.
//
//   node bullmq_app.mjs SUBCOMMAND --url redis://[user:password@]host:port/db [--prefix bull] ...
//
//   add --queue Q --name N [--n COUNT] [--delay MS] [--priority P] [--attempts A] [--backoff MS]
//       [--remove-on-complete K] [--lifo] [--data JSON]
//       adds COUNT jobs named N (backoff: fixed, MS milliseconds); prints their ids, one a line
//   work --queue Q [--concurrency C] [--lock-ms MS] [--stalled-ms MS]
//       runs a Worker; prints "ready" once it is connected; SIGTERM/SIGINT: a clean close
//   pause --queue Q / resume --queue Q
//       Queue.pause() / Queue.resume()
//   counts --queue Q
//       prints JSON of Queue.getJobCounts(): for the tests' reference only (BullMQ's count
//       script may pop a legacy wait-list marker, i.e. it writes; the exporter never calls it)
//
// The worker's processor behaves by job name: "ok" returns a value; "fail" throws (attempts and
// backoff apply; the last failure goes to the failed set); "block" runs until the file named by
// job.data.gate exists (forever without one), so a test can SIGKILL the worker mid-job and watch
// the job stay in active while its lock expires; any other name succeeds.
// On SIGTERM a running "block" job is moved back to wait (BullMQ's WaitingError: no attempt is
// used up) so that the worker can close at once; other jobs are let finish.
//
// Failures exit non-zero with the error on stderr.

import { existsSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { Queue, WaitingError, Worker } from 'bullmq';

const USAGE = 'usage: bullmq_app.mjs add|work|pause|resume|counts --url URL --queue Q [options]';

function integer(options, name, fallback) {
  const text = options[name];
  if (text === undefined) return fallback;
  if (!/^-?\d+$/.test(text)) throw new Error(`--${name} must be an integer, not ${JSON.stringify(text)}`);
  return Number(text);
}

function parse(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      url: { type: 'string' },
      prefix: { type: 'string', default: 'bull' },
      queue: { type: 'string' },
      name: { type: 'string' },
      n: { type: 'string' },
      delay: { type: 'string' },
      priority: { type: 'string' },
      attempts: { type: 'string' },
      backoff: { type: 'string' },
      'remove-on-complete': { type: 'string' },
      lifo: { type: 'boolean', default: false },
      data: { type: 'string' },
      concurrency: { type: 'string' },
      'lock-ms': { type: 'string' },
      'stalled-ms': { type: 'string' },
    },
  });
  if (positionals.length !== 1) throw new Error(USAGE);
  if (!values.url) throw new Error('--url is required');
  if (!values.queue) throw new Error('--queue is required');
  return { command: positionals[0], options: values };
}

// Short-lived commands give up on an unreachable server instead of retrying forever.
function connection(url, { shortLived }) {
  const opts = { url };
  if (shortLived) {
    opts.connectTimeout = 10000;
    opts.retryStrategy = (times) => (times > 5 ? null : 200 * times);
  }
  return opts;
}

async function withQueue(options, action) {
  const queue = new Queue(options.queue, {
    connection: connection(options.url, { shortLived: true }),
    prefix: options.prefix,
  });
  // an unreachable server is reported through 'error' events too: keep them off stdout
  queue.on('error', () => {});
  try {
    await queue.waitUntilReady();
    return await action(queue);
  } finally {
    await queue.close();
  }
}

async function add(options) {
  if (!options.name) throw new Error('--name is required');
  const count = integer(options, 'n', 1);
  const jobOpts = {};
  const delay = integer(options, 'delay', undefined);
  if (delay !== undefined) jobOpts.delay = delay;
  const priority = integer(options, 'priority', undefined);
  if (priority !== undefined) jobOpts.priority = priority;
  const attempts = integer(options, 'attempts', undefined);
  if (attempts !== undefined) jobOpts.attempts = attempts;
  const backoff = integer(options, 'backoff', undefined);
  if (backoff !== undefined) jobOpts.backoff = { type: 'fixed', delay: backoff };
  const keep = integer(options, 'remove-on-complete', undefined);
  if (keep !== undefined) jobOpts.removeOnComplete = keep;
  if (options.lifo) jobOpts.lifo = true;
  const data = options.data === undefined ? {} : JSON.parse(options.data);
  await withQueue(options, async (queue) => {
    for (let i = 0; i < count; i++) {
      const job = await queue.add(options.name, data, jobOpts);
      process.stdout.write(`${job.id}\n`);
    }
  });
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function work(options) {
  let closing = false;
  const processor = async (job, token) => {
    switch (job.name) {
      case 'ok':
        return { ok: true, id: job.id };
      case 'fail':
        throw new Error(`job ${job.id} fails (attempt ${job.attemptsMade + 1})`);
      case 'block': {
        const gate = job.data && job.data.gate;
        while (!(gate && existsSync(gate))) {
          if (closing) {
            // back to wait without using up an attempt, so close() need not wait for the gate
            await job.moveToWait(token);
            throw new WaitingError();
          }
          await sleep(50);
        }
        return { unblocked: true, id: job.id };
      }
      default:
        return { id: job.id };
    }
  };
  const worker = new Worker(options.queue, processor, {
    connection: connection(options.url, { shortLived: false }),
    prefix: options.prefix,
    concurrency: integer(options, 'concurrency', 1),
    lockDuration: integer(options, 'lock-ms', 30000),
    stalledInterval: integer(options, 'stalled-ms', 30000),
  });
  worker.on('error', (err) => process.stderr.write(`worker error: ${err.stack || err}\n`));
  let stopping;
  const stop = () => {
    closing = true;
    stopping ??= worker.close();
    return stopping;
  };
  const stopped = new Promise((resolve, reject) => {
    for (const signal of ['SIGTERM', 'SIGINT']) {
      process.once(signal, () => stop().then(resolve, reject));
    }
  });
  await worker.waitUntilReady();
  process.stdout.write('ready\n');
  await stopped;
}

async function main() {
  const { command, options } = parse(process.argv.slice(2));
  switch (command) {
    case 'add':
      return add(options);
    case 'work':
      return work(options);
    case 'pause':
      return withQueue(options, (queue) => queue.pause());
    case 'resume':
      return withQueue(options, (queue) => queue.resume());
    case 'counts':
      return withQueue(options, async (queue) => {
        process.stdout.write(`${JSON.stringify(await queue.getJobCounts())}\n`);
      });
    default:
      throw new Error(`unknown subcommand ${JSON.stringify(command)}\n${USAGE}`);
  }
}

main().then(
  () => {
    process.exitCode = 0; // connections are closed: the process ends by itself
  },
  (err) => {
    process.stderr.write(`bullmq_app: ${err && err.stack ? err.stack : err}\n`);
    process.exit(1);
  },
);
