// Go pgx v4 (Debian's golang-github-jackc-pgx-v4-dev) with its default statement cache (every
// query becomes a named server-side statement "lrupsc_..." on each connection), explicit
// Prepare (the same name in every client, each with its own text) and SendBatch (many
// Bind/Execute pipelined before one Sync), in and out of transactions.
//
//   GO111MODULE=off GOPATH=/usr/share/gocode go build -o OUT pgx_prepared.go
//   OUT URL [CLIENTS=30] [ITERATIONS=40] [TABLE=go_pgx]
//
// Every goroutine checks every result itself; the last line of stdout is a JSON summary.
// Exit status 1 on any wrong result or error.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/jackc/pgconn"
	"github.com/jackc/pgx/v4"
)

type summary struct {
	Driver       string   `json:"driver"`
	Clients      int      `json:"clients"`
	Iterations   int      `json:"iterations"`
	Transactions int64    `json:"transactions"`
	Queries      int64    `json:"queries"`
	Connected    int64    `json:"connected"`
	BackendPids  int      `json:"backend_pids"`
	Errors       []string `json:"errors"`
}

var (
	stats  summary
	mu     sync.Mutex
	pids   = map[int32]bool{}
	errs   []string
	ctx    = context.Background()
	table  string
	iters  int
)

func check(what string, got, want interface{}) {
	if fmt.Sprint(got) != fmt.Sprint(want) {
		panic(fmt.Errorf("%s: got %v, want %v", what, got, want))
	}
}

func must(err error) {
	if err != nil {
		panic(err)
	}
}

func client(url string, id int) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%v", r)
		}
	}()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	atomic.AddInt64(&stats.Connected, 1)
	q := func(n int64) { atomic.AddInt64(&stats.Queries, n) }
	mineSQL := fmt.Sprintf("SELECT $1::int * 1000 + %d, 'client %d'", id, id)
	_, err = conn.Prepare(ctx, "mine", mineSQL)
	must(err)
	insSQL := "INSERT INTO " + table + " (client, i, v) VALUES ($1, $2, $3)"
	cntSQL := "SELECT count(*)::int, coalesce(sum(v), 0)::int, pg_backend_pid() FROM " + table + " WHERE client = $1"
	rnd := rand.New(rand.NewSource(int64(id)))
	var sum int32
	rows := int32(0)
	for i := 0; i < iters; i++ {
		a, b := int32(rnd.Intn(2000000)-1000000), int32(rnd.Intn(2000000)-1000000)
		// A transaction: the statement cache, the explicit "mine" and a batch.
		tx, err := conn.Begin(ctx)
		must(err)
		var s int32
		must(tx.QueryRow(ctx, "SELECT $1::int + $2::int", a, b).Scan(&s))
		q(1)
		check("add", s, a+b)
		batch := &pgx.Batch{}
		for k := int32(0); k < 3; k++ {
			batch.Queue(insSQL, int32(id), int32(i)*3+k, a%1000+k)
			sum += a%1000 + k
		}
		batch.Queue(cntSQL, int32(id))
		batch.Queue("mine", int32(i))
		br := tx.SendBatch(ctx, batch)
		for k := 0; k < 3; k++ {
			tag, err := br.Exec()
			must(err)
			check("insert rows", tag.RowsAffected(), 1)
		}
		rows += 3
		var n, total, pid int32
		must(br.QueryRow().Scan(&n, &total, &pid))
		check("count", n, rows)
		check("sum", total, sum)
		var m int32
		var who string
		must(br.QueryRow().Scan(&m, &who))
		check("mine", m, int32(i)*1000+int32(id))
		check("who", who, fmt.Sprintf("client %d", id))
		must(br.Close())
		q(6)
		must(tx.Commit(ctx))
		atomic.AddInt64(&stats.Transactions, 1)
		mu.Lock()
		pids[pid] = true
		mu.Unlock()
		// Autocommit: a batch and single queries, each free to land on another server.
		batch = &pgx.Batch{}
		batch.Queue("SELECT $1::int + $2::int", b, int32(i))
		batch.Queue("SELECT $1::text || $2::text", fmt.Sprintf("c%d", id), fmt.Sprintf("-%d", i))
		br = conn.SendBatch(ctx, batch)
		must(br.QueryRow().Scan(&s))
		check("add (batch)", s, b+int32(i))
		var t string
		must(br.QueryRow().Scan(&t))
		check("concat (batch)", t, fmt.Sprintf("c%d-%d", id, i))
		must(br.Close())
		must(conn.QueryRow(ctx, "mine", int32(i+1)).Scan(&m, &who))
		check("mine (autocommit)", m, int32(i+1)*1000+int32(id))
		must(conn.QueryRow(ctx, "SELECT $1::int + $2::int", a, int32(i)).Scan(&s))
		check("add (autocommit)", s, a+int32(i))
		q(4)
	}
	// An error in a transaction: rolled back, and the statements keep working.
	tx, err := conn.Begin(ctx)
	must(err)
	_, err = tx.Exec(ctx, insSQL, int32(id), int32(-1), int32(5))
	must(err)
	var z int32
	err = tx.QueryRow(ctx, "SELECT 1 / $1::int", int32(0)).Scan(&z)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "22012" {
		panic(fmt.Errorf("expected division_by_zero, got %v", err))
	}
	must(tx.Rollback(ctx))
	var n, total, pid int32
	must(conn.QueryRow(ctx, cntSQL, int32(id)).Scan(&n, &total, &pid))
	check("count after rollback", n, rows)
	check("sum after rollback", total, sum)
	must(conn.QueryRow(ctx, "SELECT 1 / $1::int", int32(4)).Scan(&z))
	check("div", z, 0)
	q(4)
	return nil
}

func main() {
	url := os.Args[1]
	stats = summary{Driver: "pgx v4", Clients: 30, Iterations: 40, Errors: []string{}}
	if len(os.Args) > 2 {
		stats.Clients, _ = strconv.Atoi(os.Args[2])
	}
	if len(os.Args) > 3 {
		stats.Iterations, _ = strconv.Atoi(os.Args[3])
	}
	table = "go_pgx"
	if len(os.Args) > 4 {
		table = os.Args[4]
	}
	iters = stats.Iterations
	out := json.NewEncoder(os.Stdout)
	setup, err := pgx.Connect(ctx, url)
	if err == nil {
		_, err = setup.Exec(ctx, "DROP TABLE IF EXISTS "+table)
	}
	if err == nil {
		_, err = setup.Exec(ctx, "CREATE TABLE "+table+" (client int, i int, v int, PRIMARY KEY (client, i))")
	}
	if err != nil {
		stats.Errors = append(stats.Errors, "setup: "+err.Error())
		out.Encode(stats)
		os.Exit(1)
	}
	setup.Close(ctx)
	var wg sync.WaitGroup
	for id := 0; id < stats.Clients; id++ {
		wg.Add(1)
		go func(id int) {
			defer wg.Done()
			if err := client(url, id); err != nil {
				mu.Lock()
				errs = append(errs, fmt.Sprintf("client %d: %v", id, err))
				mu.Unlock()
			}
		}(id)
	}
	wg.Wait()
	stats.Errors = append(stats.Errors, errs...)
	stats.BackendPids = len(pids)
	out.Encode(stats)
	if len(stats.Errors) > 0 {
		os.Exit(1)
	}
}
