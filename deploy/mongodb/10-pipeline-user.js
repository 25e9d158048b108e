// mongo image initdb hook (runs once, on an empty volume, as MONGO_INITDB_ROOT_USERNAME):
// the pipeline's user, readWrite on spatial_etl and nothing else, from
// MONGO_PIPELINE_USER/MONGO_PIPELINE_PASSWORD. For a volume initialised before this existed:
//   docker compose exec mongodb sh -c 'mongosh -u "$MONGO_INITDB_ROOT_USERNAME" \
//     -p "$MONGO_INITDB_ROOT_PASSWORD" --authenticationDatabase admin \
//     /docker-entrypoint-initdb.d/10-pipeline-user.js'
const user = process.env.MONGO_PIPELINE_USER;
const pwd = process.env.MONGO_PIPELINE_PASSWORD;
if (!user || !pwd) {
  throw new Error("set MONGO_PIPELINE_USER and MONGO_PIPELINE_PASSWORD for the mongodb service");
}
const etl = db.getSiblingDB("spatial_etl");
const roles = [{ role: "readWrite", db: "spatial_etl" }];
if (etl.getUser(user)) {
  etl.updateUser(user, { pwd: pwd, roles: roles });
} else {
  etl.createUser({ user: user, pwd: pwd, roles: roles });
}
