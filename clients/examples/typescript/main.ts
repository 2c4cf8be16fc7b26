// Enqueue, lease, ack, fail and list failed jobs with openapi-fetch, typed by what
// openapi-typescript generates from openapi/openapi.json (schema.d.ts). Every optional
// field is left out, except the max_retries that makes the second job fail for good.
import createClient from "openapi-fetch";
import type { paths } from "./schema.js";

const client = createClient<paths>({
  baseUrl: process.env.BGJOBS_URL ?? "http://127.0.0.1:8000",
  headers: { Authorization: `Bearer ${process.env.BGJOBS_TOKEN ?? "none"}` },
});

/** The body of a successful answer; any other answer stops the script with its detail. */
function ok<T>(result: { data?: T; error?: unknown; response: Response }): T {
  if (result.data === undefined) {
    throw new Error(`HTTP ${result.response.status}: ${JSON.stringify(result.error)}`);
  }
  return result.data;
}

/** Reserve one send_email job: it was enqueued just before, so there is no need to wait. */
async function leaseOne(): Promise<string> {
  const body = { worker_id: "worker-1", names: ["send_email"] };
  const [lease] = ok(await client.POST("/leases", { body })).leases;
  if (lease === undefined) throw new Error("no job to lease");
  return lease.id;
}

const first = ok(
  await client.POST("/jobs", {
    body: { name: "send_email", payload: '{"to": "ada@example.com"}' },
  }),
);
console.log(`enqueued ${first.id} ${first.state}`);
const acked = ok(
  await client.POST("/leases/{lease_id}/ack", {
    params: { path: { lease_id: await leaseOne() } },
  }),
);
console.log(`acked ${acked.id} ${acked.state}`);

const second = ok(
  await client.POST("/jobs", {
    body: { name: "send_email", payload: '{"to": "bob@example.com"}', max_retries: 0 },
  }),
);
console.log(`enqueued ${second.id} ${second.state}`);
const failed = ok(
  await client.POST("/leases/{lease_id}/fail", {
    params: { path: { lease_id: await leaseOne() } },
    body: { exception: "SMTP server said 550: no such user" },
  }),
);
console.log(`failed ${failed.job.id} ${failed.outcome}`);

const page = ok(await client.GET("/jobs/failed", { params: { query: { limit: 10 } } }));
for (const job of page.items) console.log(`listed failed ${job.id}: ${job.exception}`);
