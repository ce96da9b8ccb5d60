// pgjdbc with prepareThreshold=1: every PreparedStatement becomes a named server-side statement
// (S_1, S_2, ... in every connection, each with its own texts) from its first execution on,
// reused across transactions; executeBatch pipelines many Bind/Execute before one Sync.
//
//   javac -cp /usr/share/java/postgresql.jar -d OUT PgjdbcPrepared.java
//   java -cp /usr/share/java/postgresql.jar:OUT PgjdbcPrepared JDBC_URL [CLIENTS=30] [ITERATIONS=40] [TABLE]
//
// JDBC_URL like jdbc:postgresql://127.0.0.1:6432/db1?user=u&password=p (prepareThreshold=1 is
// added).  Every thread checks every result itself; the last line of stdout is a JSON
// summary.  Exit status 1 on any wrong result or error.

import java.sql.*;
import java.util.*;
import java.util.concurrent.*;
import java.util.concurrent.atomic.*;

public class PgjdbcPrepared {
    static final AtomicLong transactions = new AtomicLong(), queries = new AtomicLong(),
            connected = new AtomicLong();
    static final Set<Integer> pids = ConcurrentHashMap.newKeySet();
    static final List<String> errors = Collections.synchronizedList(new ArrayList<>());

    static void check(String what, Object got, Object want) {
        if (!Objects.equals(got, want))
            throw new IllegalStateException(what + ": got " + got + ", want " + want);
    }

    static int one(PreparedStatement ps) throws SQLException {
        queries.incrementAndGet();
        try (ResultSet rs = ps.executeQuery()) {
            if (!rs.next()) throw new IllegalStateException("no row");
            return rs.getInt(1);
        }
    }

    static void client(String url, int id, int iterations, String table) throws Exception {
        Random rnd = new Random();
        try (Connection c = DriverManager.getConnection(url)) {
            connected.incrementAndGet();
            PreparedStatement add = c.prepareStatement("SELECT ?::int + ?::int");
            PreparedStatement ins = c.prepareStatement(
                    "INSERT INTO " + table + " (client, i, v) VALUES (?, ?, ?)");
            PreparedStatement cnt = c.prepareStatement(
                    "SELECT count(*)::int, coalesce(sum(v), 0)::int, pg_backend_pid() FROM "
                    + table + " WHERE client = ?");
            PreparedStatement mine = c.prepareStatement(
                    "SELECT ?::int * 1000 + " + id + ", 'client " + id + "'");
            PreparedStatement div = c.prepareStatement("SELECT 1 / ?::int");
            long sum = 0;
            int rows = 0;
            for (int i = 0; i < iterations; i++) {
                int a = rnd.nextInt(2000000) - 1000000, b = rnd.nextInt(2000000) - 1000000;
                // A transaction: prepared statements plus a batch insert (executeBatch).
                c.setAutoCommit(false);
                add.setInt(1, a);
                add.setInt(2, b);
                check("add", one(add), a + b);
                for (int k = 0; k < 3; k++) {
                    ins.setInt(1, id);
                    ins.setInt(2, i * 3 + k);
                    ins.setInt(3, a % 1000 + k);
                    ins.addBatch();
                    sum += a % 1000 + k;
                }
                queries.addAndGet(3);
                int[] counts = ins.executeBatch();
                check("batch size", counts.length, 3);
                for (int n : counts) check("batch row count", n, 1);
                rows += 3;
                cnt.setInt(1, id);
                queries.incrementAndGet();
                try (ResultSet rs = cnt.executeQuery()) {
                    rs.next();
                    check("count", rs.getInt(1), rows);
                    check("sum", (long) rs.getInt(2), sum);
                    pids.add(rs.getInt(3));
                }
                mine.setInt(1, i);
                queries.incrementAndGet();
                try (ResultSet rs = mine.executeQuery()) {
                    rs.next();
                    check("mine", rs.getInt(1), i * 1000 + id);
                    check("who", rs.getString(2), "client " + id);
                }
                c.commit();
                transactions.incrementAndGet();
                // Autocommit: each statement may land on another server.
                c.setAutoCommit(true);
                add.setInt(1, b);
                add.setInt(2, i);
                check("add (autocommit)", one(add), b + i);
                mine.setInt(1, i + 1);
                check("mine (autocommit)", one(mine), (i + 1) * 1000 + id);
            }
            // An error in a transaction: rolled back, and the statements keep working.
            c.setAutoCommit(false);
            ins.setInt(1, id);
            ins.setInt(2, -1);
            ins.setInt(3, 5);
            queries.incrementAndGet();
            ins.executeUpdate();
            div.setInt(1, 0);
            try {
                one(div);
                throw new IllegalStateException("division by zero did not fail");
            } catch (SQLException e) {
                check("sqlstate", e.getSQLState(), "22012");
            }
            c.rollback();
            c.setAutoCommit(true);
            cnt.setInt(1, id);
            queries.incrementAndGet();
            try (ResultSet rs = cnt.executeQuery()) {
                rs.next();
                check("count after rollback", rs.getInt(1), rows);
                check("sum after rollback", (long) rs.getInt(2), sum);
            }
            div.setInt(1, 4);
            check("div", one(div), 0);
        }
    }

    static String json(String s) {
        return "\"" + s.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")
                .replace("\r", "").replace("\t", " ") + "\"";
    }

    public static void main(String[] args) throws Exception {
        String url = args[0];
        if (!url.contains("prepareThreshold="))
            url += (url.contains("?") ? "&" : "?") + "prepareThreshold=1";
        int clients = args.length > 1 ? Integer.parseInt(args[1]) : 30;
        int iterations = args.length > 2 ? Integer.parseInt(args[2]) : 40;
        String table = args.length > 3 ? args[3] : "java_pgjdbc";
        try (Connection c = DriverManager.getConnection(url); Statement s = c.createStatement()) {
            s.execute("DROP TABLE IF EXISTS " + table);
            s.execute("CREATE TABLE " + table + " (client int, i int, v int, PRIMARY KEY (client, i))");
        }
        final String u = url;
        ExecutorService pool = Executors.newFixedThreadPool(clients);
        List<Future<?>> futures = new ArrayList<>();
        for (int id = 0; id < clients; id++) {
            final int cid = id;
            futures.add(pool.submit(() -> {
                try {
                    client(u, cid, iterations, table);
                } catch (Throwable e) {
                    errors.add("client " + cid + ": " + e);
                }
            }));
        }
        for (Future<?> f : futures) f.get();
        pool.shutdown();
        StringBuilder errs = new StringBuilder("[");
        synchronized (errors) {
            for (int i = 0; i < errors.size(); i++) errs.append(i > 0 ? "," : "").append(json(errors.get(i)));
        }
        errs.append("]");
        System.out.println("{\"driver\": \"pgjdbc\", \"version\": " + json(org.postgresql.Driver.getVersion())
                + ", \"clients\": " + clients + ", \"iterations\": " + iterations
                + ", \"transactions\": " + transactions + ", \"queries\": " + queries
                + ", \"connected\": " + connected + ", \"backend_pids\": " + pids.size()
                + ", \"errors\": " + errs + "}");
        System.exit(errors.isEmpty() ? 0 : 1);
    }
}
