// node-postgres with named queries ({name, text, values}): after the first use of a name on a
// connection, node-postgres sends only Bind/Execute for it, so a pooler in transaction mode
// must make the statement exist on whichever server the next transaction lands on.
//
//   node pg_named.js URL [CLIENTS=30] [ITERATIONS=40] [TABLE=node_pg_named]
//
// Every client checks every result itself; the last line of stdout is a JSON summary.
// Exit status 1 on any wrong result or error.
'use strict';
const { Client } = require('pg');

const url = process.argv[2] || process.env.DATABASE_URL;
const clients = parseInt(process.argv[3] || '30', 10);
const iterations = parseInt(process.argv[4] || '40', 10);
const table = process.argv[5] || 'node_pg_named';

const stats = { driver: 'node-postgres', clients, iterations, transactions: 0, queries: 0,
                connected: 0, backend_pids: 0, errors: [] };
const pids = new Set();

function rnd() { return Math.floor(Math.random() * 2000000) - 1000000; }
function check(what, got, want) {
  if (got !== want) throw new Error(`${what}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
}

async function q(c, query) { stats.queries++; return c.query(query); }

async function worker(id) {
  const c = new Client({ connectionString: url });
  await c.connect();
  stats.connected++;
  let sum = 0;
  try {
    for (let i = 0; i < iterations; i++) {
      const a = rnd(), b = rnd();
      // A transaction with named statements shared by every client (same name, same text).
      await q(c, 'BEGIN');
      let r = await q(c, { name: 'add', text: 'SELECT $1::int + $2::int AS s', values: [a, b] });
      check('add', r.rows[0].s, a + b);
      r = await q(c, { name: 'ins', values: [id, i, a % 1000],
                       text: `INSERT INTO ${table} (client, i, v) VALUES ($1, $2, $3)` });
      check('insert rowCount', r.rowCount, 1);
      sum += a % 1000;
      r = await q(c, { name: 'cnt', values: [id],
                       text: `SELECT count(*)::int AS n, coalesce(sum(v), 0)::int AS s, pg_backend_pid() AS pid FROM ${table} WHERE client = $1` });
      check('count', r.rows[0].n, i + 1);
      check('sum', r.rows[0].s, sum);
      pids.add(r.rows[0].pid);
      // The same name in every client, with a text of its own.
      r = await q(c, { name: 'mine', text: `SELECT $1::int * 1000 + ${id} AS m, 'client ${id}' AS who`,
                       values: [i] });
      check('mine', r.rows[0].m, i * 1000 + id);
      check('who', r.rows[0].who, `client ${id}`);
      await q(c, 'COMMIT');
      stats.transactions++;
      // Outside a transaction (autocommit): each statement may land on another server.
      r = await q(c, { name: 'add', text: 'SELECT $1::int + $2::int AS s', values: [b, i] });
      check('add (autocommit)', r.rows[0].s, b + i);
      r = await q(c, { name: 'concat', text: 'SELECT $1::text || $2::text AS t', values: ['c' + id, '-' + i] });
      check('concat', r.rows[0].t, `c${id}-${i}`);
      r = await q(c, { name: 'mine', text: `SELECT $1::int * 1000 + ${id} AS m, 'client ${id}' AS who`,
                       values: [i + 1] });
      check('mine (autocommit)', r.rows[0].m, (i + 1) * 1000 + id);
    }
    // A rolled-back transaction leaves nothing behind, and the statements still work after it.
    await q(c, 'BEGIN');
    await q(c, { name: 'ins', values: [id, -1, 5], text: `INSERT INTO ${table} (client, i, v) VALUES ($1, $2, $3)` });
    await q(c, 'ROLLBACK');
    const r = await q(c, { name: 'cnt', values: [id],
                           text: `SELECT count(*)::int AS n, coalesce(sum(v), 0)::int AS s, pg_backend_pid() AS pid FROM ${table} WHERE client = $1` });
    check('count after rollback', r.rows[0].n, iterations);
    check('sum after rollback', r.rows[0].s, sum);
  } finally {
    await c.end().catch(() => {});
  }
}

async function main() {
  const setup = new Client({ connectionString: url });
  await setup.connect();
  await setup.query(`DROP TABLE IF EXISTS ${table}`);
  await setup.query(`CREATE TABLE ${table} (client int, i int, v int, PRIMARY KEY (client, i))`);
  await setup.end();
  const results = await Promise.allSettled(
    Array.from({ length: clients }, (_, id) => worker(id)));
  for (const [id, r] of results.entries()) {
    if (r.status === 'rejected') stats.errors.push(`client ${id}: ${r.reason && r.reason.message || r.reason}`);
  }
  stats.backend_pids = pids.size;
  console.log(JSON.stringify(stats));
  process.exit(stats.errors.length ? 1 : 0);
}

main().catch((e) => {
  stats.errors.push(`setup: ${e.message}`);
  console.log(JSON.stringify(stats));
  process.exit(1);
});
