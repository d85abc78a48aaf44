// The handler Auth0's "Synchronize data across systems" guide describes, written the way a team following
// it would: Express, node-postgres, a bearer check, one guarded upsert per event, a plain DELETE. No ledger,
// no tombstones, no dead letters. `make bench` measures the relay against it, side by side.
const express = require("express");
const { Pool } = require("pg");

const schema = process.env.GUIDE_SCHEMA;
const token = process.env.GUIDE_TOKEN;
const pool = new Pool({ connectionString: process.env.DATABASE_URL });
const app = express();
app.use(express.json({ limit: "256kb" }));

const UPSERT = `
INSERT INTO ${schema}.users (user_id, email, name, nickname, created_at, updated_at, raw_user, last_event_processed)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (user_id) DO UPDATE SET
  email = EXCLUDED.email, name = EXCLUDED.name, nickname = EXCLUDED.nickname,
  created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, raw_user = EXCLUDED.raw_user,
  last_event_processed = EXCLUDED.last_event_processed
WHERE ${schema}.users.last_event_processed < EXCLUDED.last_event_processed`;

app.post("/events/webhook", async (req, res) => {
  if (req.headers.authorization !== `Bearer ${token}`) {
    return res.status(401).send("Unauthorized");
  }
  const { type, time, data } = req.body;
  const user = data.object;
  try {
    if (type === "user.created" || type === "user.updated") {
      await pool.query(UPSERT, [user.user_id, user.email, user.name, user.nickname, user.created_at,
        user.updated_at, user, time]);
    } else if (type === "user.deleted") {
      await pool.query(`DELETE FROM ${schema}.users WHERE user_id = $1`, [user.user_id]);
    }
    res.status(204).end();
  } catch (error) {
    console.error(error);
    res.status(500).end();
  }
});

app.get("/healthz", (req, res) => res.json({ status: "ok" }));

app.listen(Number(process.env.PORT), "127.0.0.1");
