// postgres.js (npm "postgres") with its defaults: every query is a named prepared statement,
// and queries issued together are pipelined on one connection.  Transactions use sql.begin.
//
//   node postgresjs.js URL [CLIENTS=30] [ITERATIONS=40] [TABLE=node_postgresjs]
//
// Every worker checks every result itself; the last line of stdout is a JSON summary.
// Exit status 1 on any wrong result or error.
'use strict';
const postgres = require('postgres');

const url = process.argv[2] || process.env.DATABASE_URL;
const clients = parseInt(process.argv[3] || '30', 10);
const iterations = parseInt(process.argv[4] || '40', 10);
const table = process.argv[5] || 'node_postgresjs';

const stats = { driver: 'postgres.js', clients, iterations, transactions: 0, queries: 0,
                connected: 0, backend_pids: 0, errors: [] };
const pids = new Set();

function rnd() { return Math.floor(Math.random() * 2000000) - 1000000; }
function check(what, got, want) {
  if (got !== want) throw new Error(`${what}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
}

async function worker(sql, id) {
  let sum = 0;
  for (let i = 0; i < iterations; i++) {
    const a = rnd(), b = rnd();
    // A transaction on a connection of its own, with pipelined prepared statements in it.
    const [add, ins, cnt, mine] = await sql.begin((tx) => [
      tx`SELECT ${a}::int + ${b}::int AS s`,
      tx`INSERT INTO ${tx(table)} (client, i, v) VALUES (${id}, ${i}, ${a % 1000})`,
      tx`SELECT count(*)::int AS n, coalesce(sum(v), 0)::int AS s, pg_backend_pid() AS pid
         FROM ${tx(table)} WHERE client = ${id}`,
      tx.unsafe(`SELECT $1::int * 1000 + ${id} AS m, 'client ${id}' AS who`, [i], { prepare: true }),
    ]);
    stats.queries += 4;
    sum += a % 1000;
    check('add', add[0].s, a + b);
    check('insert count', ins.count, 1);
    check('count', cnt[0].n, i + 1);
    check('sum', cnt[0].s, sum);
    pids.add(cnt[0].pid);
    check('mine', mine[0].m, i * 1000 + id);
    check('who', mine[0].who, `client ${id}`);
    stats.transactions++;
    // Autocommit: pipelined prepared statements, each free to land on another server.
    const [add2, cat, mine2] = await Promise.all([
      sql`SELECT ${b}::int + ${i}::int AS s`,
      sql`SELECT ${'c' + id}::text || ${'-' + i}::text AS t`,
      sql.unsafe(`SELECT $1::int * 1000 + ${id} AS m, 'client ${id}' AS who`, [i + 1], { prepare: true }),
    ]);
    stats.queries += 3;
    check('add (autocommit)', add2[0].s, b + i);
    check('concat', cat[0].t, `c${id}-${i}`);
    check('mine (autocommit)', mine2[0].m, (i + 1) * 1000 + id);
  }
  // An error inside sql.begin rolls back; the prepared statements keep working afterwards.
  let failed = null;
  try {
    await sql.begin(async (tx) => {
      await tx`INSERT INTO ${tx(table)} (client, i, v) VALUES (${id}, ${-1}, ${5})`;
      await tx`SELECT 1 / ${0}::int AS boom`;
    });
  } catch (e) {
    failed = e;
  }
  stats.queries += 2;
  if (!failed || failed.code !== '22012') throw new Error(`expected division_by_zero, got ${failed}`);
  const cnt = await sql`SELECT count(*)::int AS n, coalesce(sum(v), 0)::int AS s, pg_backend_pid() AS pid
                        FROM ${sql(table)} WHERE client = ${id}`;
  stats.queries++;
  check('count after rollback', cnt[0].n, iterations);
  check('sum after rollback', cnt[0].s, sum);
}

async function main() {
  const setup = postgres(url, { max: 1, onnotice: () => {} });
  await setup.unsafe(`DROP TABLE IF EXISTS ${table}`);
  await setup.unsafe(`CREATE TABLE ${table} (client int, i int, v int, PRIMARY KEY (client, i))`);
  await setup.end();

  const sql = postgres(url, { max: clients, prepare: true, connect_timeout: 30, idle_timeout: 0,
                              onnotice: () => {} });
  // One connection per worker: open them all first (each sql.begin holds one).
  await Promise.all(Array.from({ length: clients }, () =>
    sql.begin(async (tx) => { await tx`SELECT pg_sleep(0.05)`; stats.connected++; })));
  const results = await Promise.allSettled(
    Array.from({ length: clients }, (_, id) => worker(sql, id)));
  for (const [id, r] of results.entries()) {
    if (r.status === 'rejected') stats.errors.push(`worker ${id}: ${r.reason && r.reason.message || r.reason}`);
  }
  await sql.end({ timeout: 5 });
  stats.backend_pids = pids.size;
  console.log(JSON.stringify(stats));
  process.exit(stats.errors.length ? 1 : 0);
}

main().catch((e) => {
  stats.errors.push(`setup: ${e.message}`);
  console.log(JSON.stringify(stats));
  process.exit(1);
});
