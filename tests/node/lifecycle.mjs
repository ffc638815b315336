// The whole Batch API lifecycle through the official `openai` Node SDK.
//
// Run by tests/integration/test_node_sdk.py against a real `batchd serve` in front of
// FakeUpstream: `BATCHD_BASE_URL=http://127.0.0.1:PORT/v1 node tests/node/lifecycle.mjs`.
// It prints ONE JSON object on stdout with everything the Python side asserts and checks
// against OpenAI's schema; anything unexpected goes to stderr with a non-zero exit.

import OpenAI, { APIError, NotFoundError, toFile } from 'openai';
import { VERSION } from 'openai/version';

const TERMINAL = new Set(['completed', 'failed', 'expired', 'cancelled']);
const baseURL = process.env.BATCHD_BASE_URL;
if (!baseURL) fail('BATCHD_BASE_URL is not set');
const DEADLINE_MS = Number(process.env.LIFECYCLE_WAIT_MS || 60000);

function fail(message) {
  process.stderr.write(`lifecycle.mjs: ${message}\n`);
  process.exit(1);
}

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Every HTTP exchange, as the SDK saw it: the Python side checks each JSON answer against
// the spec (the Node SDK has no ContractHook of its own) and that each has an x-request-id.
const exchanges = [];
async function recordingFetch(input, init) {
  const response = await fetch(input, init);
  const url = new URL(typeof input === 'string' || input instanceof URL ? input : input.url);
  // The SDK fetches a `data:` URL once to probe for FormData support: not an exchange.
  if (!url.protocol.startsWith('http')) return response;
  const entry = {
    method: (init?.method || (input instanceof Request ? input.method : 'GET')).toUpperCase(),
    path: url.pathname,
    query: url.search,
    status: response.status,
    request_id: response.headers.get('x-request-id'),
    content_type: response.headers.get('content-type'),
    json: null,
  };
  if ((entry.content_type || '').includes('application/json')) {
    try {
      entry.json = JSON.parse(await response.clone().text());
    } catch (err) {
      entry.json_error = String(err);
    }
  }
  exchanges.push(entry);
  return response;
}

const client = new OpenAI({
  baseURL,
  apiKey: 'test-key',
  fetch: recordingFetch,
  timeout: 30000,
});

function chatLine(i, extra = {}) {
  return {
    custom_id: `req-${i}`,
    method: 'POST',
    url: '/v1/chat/completions',
    body: { model: 'fake-model', messages: [{ role: 'user', content: `hello ${i}` }], ...extra },
  };
}

const jsonl = (lines) => lines.map((l) => JSON.stringify(l) + '\n').join('');

async function upload(name, lines) {
  const file = await toFile(Buffer.from(jsonl(lines)), name);
  return client.files.create({ file, purpose: 'batch' });
}

// Poll until `done(batch)` holds, returning the last batch and every status seen on the way.
async function pollBatch(id, done, what) {
  const seen = [];
  const deadline = Date.now() + DEADLINE_MS;
  for (;;) {
    const batch = await client.batches.retrieve(id);
    if (seen.at(-1) !== batch.status) seen.push(batch.status);
    if (done(batch)) return { batch, seen };
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; last: ${JSON.stringify(batch)}`);
    await sleep(50);
  }
}

const parseLines = (text) =>
  text
    .split('\n')
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l));

async function download(fileId) {
  if (!fileId) return { lines: [], bytes: 0 };
  const response = await client.files.content(fileId);
  check(response.ok, `content of ${fileId} answered ${response.status}`);
  const text = await response.text();
  return { lines: parseLines(text), bytes: Buffer.byteLength(text) };
}

// Page through a list endpoint one item at a time, keeping each page's raw JSON body.
async function pageThrough(list) {
  const pages = [];
  let page = await list({ limit: 1 });
  for (;;) {
    pages.push(page.body);
    if (!page.hasNextPage()) break;
    check(pages.length < 100, 'pagination does not end');
    page = await page.getNextPage();
  }
  const ids = pages.flatMap((p) => p.data.map((x) => x.id));
  const autoIds = [];
  for await (const item of list({ limit: 1 })) autoIds.push(item.id);
  const full = (await list({ limit: 100 })).body;
  const afterLast = (await list({ after: ids.at(-1) })).body;
  return { pages, ids, auto_ids: autoIds, full, after_last: afterLast };
}

function errorInfo(err) {
  return {
    class: err?.constructor?.name,
    is_not_found: err instanceof NotFoundError,
    status: err?.status,
    code: err?.code ?? null,
    param: err?.param ?? null,
    type: err?.type ?? null,
    message: err?.message,
    error: err?.error ?? null,
    request_id: err?.requestID ?? null,
  };
}

async function expectNotFound(call, what) {
  try {
    const value = await call();
    throw new Error(`${what} should be a 404, got ${JSON.stringify(value)}`);
  } catch (err) {
    if (!(err instanceof NotFoundError)) throw err;
    return errorInfo(err);
  }
}

async function main() {
  const result = { sdk_version: VERSION };

  // 1. A small batch: most lines succeed, every third one gets a 400 from the upstream.
  const lines = Array.from({ length: 10 }, (_, i) => chatLine(i, i % 3 === 0 ? { fake_status: 400 } : {}));
  const input = await upload('lifecycle.jsonl', lines);
  const inputRetrieved = await client.files.retrieve(input.id);
  const created = await client.batches.create({
    input_file_id: input.id,
    endpoint: '/v1/chat/completions',
    completion_window: '24h',
    metadata: { job: 'node-sdk', run: '1' },
  });
  const { batch: done, seen } = await pollBatch(created.id, (b) => TERMINAL.has(b.status), 'batch 1 to end');
  const retrieved = await client.batches.retrieve(created.id);
  const output = await download(done.output_file_id);
  const errors = await download(done.error_file_id);
  const outputFile = done.output_file_id ? await client.files.retrieve(done.output_file_id) : null;
  const errorFile = done.error_file_id ? await client.files.retrieve(done.error_file_id) : null;
  Object.assign(result, {
    lines,
    input_file: input,
    input_file_retrieved: inputRetrieved,
    created,
    statuses_seen: seen,
    done,
    retrieved,
    output_lines: output.lines,
    output_bytes: output.bytes,
    error_lines: errors.lines,
    error_bytes: errors.bytes,
    output_file: outputFile,
    error_file: errorFile,
  });

  // 2. A bigger batch, cancelled while it runs.
  const bigLines = Array.from({ length: 200 }, (_, i) => chatLine(`big-${i}`));
  const bigInput = await upload('big.jsonl', bigLines);
  const big = await client.batches.create({
    input_file_id: bigInput.id,
    endpoint: '/v1/chat/completions',
    completion_window: '24h',
  });
  const { batch: running } = await pollBatch(
    big.id,
    (b) => TERMINAL.has(b.status) || b.request_counts.completed >= 10,
    'batch 2 to make progress',
  );
  check(!TERMINAL.has(running.status), `batch 2 ended before it could be cancelled: ${running.status}`);
  const cancelling = await client.batches.cancel(big.id);
  const { batch: cancelled, seen: cancelSeen } = await pollBatch(
    big.id,
    (b) => TERMINAL.has(b.status),
    'batch 2 to be cancelled',
  );
  const cancelAgain = await client.batches.cancel(big.id);
  const bigOutput = await download(cancelled.output_file_id);
  const bigErrors = await download(cancelled.error_file_id);
  Object.assign(result, {
    big_line_ids: bigLines.map((l) => l.custom_id),
    big_input_file: bigInput,
    big_created: big,
    big_running: running,
    cancelling,
    cancel_statuses_seen: cancelSeen,
    cancelled,
    cancel_again: cancelAgain,
    big_output_lines: bigOutput.lines,
    big_error_lines: bigErrors.lines,
  });

  // 3. Lists, one item a page.
  result.files_list = await pageThrough((params) => client.files.list(params));
  result.batches_list = await pageThrough((params) => client.batches.list(params));

  // 4. Delete a file; it is gone afterwards.
  result.deleted = await client.files.delete(input.id);
  result.retrieve_deleted = await expectNotFound(() => client.files.retrieve(input.id), 'retrieve of a deleted file');
  result.content_deleted = await expectNotFound(async () => {
    const r = await client.files.content(input.id);
    return r.status;
  }, 'content of a deleted file');
  result.retrieve_unknown_batch = await expectNotFound(
    () => client.batches.retrieve('batch_doesnotexist'),
    'retrieve of an unknown batch',
  );
  result.files_after_delete = (await client.files.list({ limit: 100 })).body;

  result.exchanges = exchanges;
  process.stdout.write(JSON.stringify(result) + '\n');
}

main().catch((err) => {
  const detail = err instanceof APIError ? ` ${JSON.stringify(errorInfo(err))}` : '';
  fail(`${err?.stack || err}${detail}`);
});
