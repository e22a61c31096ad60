/** The admin API's description, served at GET /api/openapi.json (OpenAPI 3.1). */

const error = {
  description: 'An error with a stable code',
  content: { 'application/json': { schema: { $ref: '#/components/schemas/Error' } } },
}
const ok = (schema: unknown, description = 'OK'): unknown => ({ description, content: { 'application/json': { schema } } })
const auth = [{ bearer: [] }]
const ruleSetBody = {
  required: true,
  content: { 'application/json': { schema: { $ref: '#/components/schemas/RuleSet' } } },
}

export const OPENAPI = {
  openapi: '3.1.0',
  info: {
    title: 'meliproxy admin API',
    version: '1',
    description:
      'Statistics, rate-limit rules, cache purge and status of a meliproxy instance. Mutating calls need ' +
      '`Authorization: Bearer <--admin-token>`; on a non-loopback admin address every call does.',
  },
  components: {
    securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } },
    schemas: {
      Error: {
        type: 'object',
        required: ['error', 'message'],
        properties: { error: { type: 'string' }, message: { type: 'string' }, field: { type: 'string' } },
      },
      Rule: {
        type: 'object',
        required: ['name', 'limit', 'window'],
        properties: {
          name: { type: 'string', pattern: '^[A-Za-z0-9_.-]{1,64}$' },
          match: {
            type: 'object',
            properties: {
              ip: { type: 'array', items: { type: 'string' } },
              path: { type: 'array', items: { type: 'string' } },
              method: { type: 'array', items: { type: 'string' } },
              header: { type: 'object', additionalProperties: { type: 'string' } },
            },
          },
          per: { type: 'array', items: { type: 'string', description: 'ip, path, method or header:<name>' } },
          limit: { type: 'integer', minimum: 1 },
          window: { type: 'string', examples: ['30s', '1m', '1h'] },
          algorithm: { type: 'string', enum: ['fixed', 'sliding', 'token-bucket'], default: 'fixed' },
          burst: { type: 'integer', minimum: 1, description: 'token-bucket only: the bucket size (default: limit)' },
          mode: { type: 'string', enum: ['enforce', 'shadow'], default: 'enforce' },
          cost: {
            description: 'units a request uses: a number, or a request header bounded by max',
            default: 1,
            oneOf: [
              { type: 'integer', minimum: 1 },
              {
                type: 'object',
                required: ['header', 'max'],
                additionalProperties: false,
                properties: { header: { type: 'string' }, max: { type: 'integer', minimum: 1 } },
              },
            ],
          },
          onExceed: { type: 'string', enum: ['reject', 'delay'], default: 'reject' },
          maxDelay: { type: 'string', default: '1s', description: 'onExceed: delay only; at most 60s', examples: ['500ms', '3s'] },
          whenRedisDown: { type: 'string', enum: ['local', 'allow', 'deny'], default: 'local' },
        },
      },
      RuleSet: {
        type: 'object',
        required: ['limits'],
        properties: {
          limits: { type: 'array', items: { $ref: '#/components/schemas/Rule' } },
          allow: { type: 'array', items: { type: 'string', description: 'IP or CIDR' } },
          deny: { type: 'array', items: { type: 'string', description: 'IP or CIDR' } },
        },
      },
      RuleVersion: {
        allOf: [
          { $ref: '#/components/schemas/RuleSet' },
          {
            type: 'object',
            properties: {
              version: { type: 'integer', description: '0 is the config file' },
              updatedAt: { type: 'string', format: 'date-time' },
              source: { enum: ['config', 'api', 'rollback'] },
            },
          },
        ],
      },
      LimitsReset: {
        type: 'object',
        required: ['rule', 'key', 'generation'],
        properties: {
          rule: { type: 'string' },
          key: { type: ['string', 'null'] },
          generation: {
            type: 'integer',
            description: "the rule's generation now; a reset of the whole rule starts the next one, whose buckets all start empty on every instance",
          },
          cleared: { type: 'integer', description: 'with key only: the counters of that bucket deleted (0 when it held none)' },
        },
      },
      Stats: {
        type: 'object',
        properties: {
          from: { type: 'string', format: 'date-time' },
          to: { type: 'string', format: 'date-time' },
          resolution: { enum: ['minute', 'hour'] },
          group: { type: 'string' },
          totals: { type: 'object' },
          series: { type: 'array', items: { type: 'object' } },
          top: { type: 'array', items: { type: 'object', properties: { key: { type: 'string' }, requests: { type: 'integer' } } } },
        },
      },
    },
  },
  paths: {
    '/healthz': { get: { summary: 'Liveness', responses: { '200': ok({ type: 'object' }) } } },
    '/readyz': {
      get: { summary: 'Readiness: 200 while workers listen and the instance is not shutting down; Redis and breaker states are reported in the body, never a reason for 503', responses: { '200': ok({ type: 'object' }), '503': ok({ type: 'object' }, 'Not ready') } },
    },
    '/metrics': { get: { summary: 'Prometheus metrics, summed over the workers', responses: { '200': { description: 'text exposition format' } } } },
    '/api/status': { get: { summary: 'Version, uptime, workers, Redis, rules version, upstream and route circuit breakers', responses: { '200': ok({ type: 'object' }) } } },
    '/api/stats': {
      get: {
        summary: 'Totals, time series and top entries over a time range',
        parameters: [
          { name: 'from', in: 'query', schema: { type: 'string' }, description: 'ISO 8601, epoch ms, now, now-1h (default: to - 1h)' },
          { name: 'to', in: 'query', schema: { type: 'string' }, description: 'default: now' },
          { name: 'group', in: 'query', schema: { enum: ['route', 'method', 'status', 'cache', 'rule', 'ip', 'path', 'pair'] } },
          { name: 'limit', in: 'query', schema: { type: 'integer', minimum: 1, maximum: 100 } },
        ],
        responses: { '200': ok({ $ref: '#/components/schemas/Stats' }), '400': error },
      },
    },
    '/api/limits': {
      get: { summary: 'The rule set in force', responses: { '200': ok({ $ref: '#/components/schemas/RuleVersion' }) } },
      put: {
        summary: 'Replace the whole rule set (validated like the config file; applied by every instance within 1 s)',
        security: auth,
        requestBody: ruleSetBody,
        responses: { '200': ok({ $ref: '#/components/schemas/RuleVersion' }), '400': error, '401': error, '503': error },
      },
    },
    '/api/limits/history': {
      get: { summary: 'Stored versions, newest first', responses: { '200': ok({ type: 'object' }) } },
    },
    '/api/limits/rollback': {
      post: {
        summary: 'Store an earlier version again as the newest',
        security: auth,
        requestBody: { required: true, content: { 'application/json': { schema: { type: 'object', properties: { version: { type: 'integer' } } } } } },
        responses: { '200': ok({ $ref: '#/components/schemas/RuleVersion' }), '400': error, '401': error, '404': error },
      },
    },
    '/api/limits/reset': {
      post: {
        summary: "Clear a rule's counters (one step for every instance), or one bucket's",
        security: auth,
        requestBody: {
          required: true,
          content: {
            'application/json': {
              schema: {
                type: 'object',
                required: ['rule'],
                properties: {
                  rule: { type: 'string' },
                  key: { type: 'string', description: "one bucket: the rule's per values joined by | (with one per, the value itself)" },
                },
              },
            },
          },
        },
        responses: { '200': ok({ $ref: '#/components/schemas/LimitsReset' }), '400': error, '401': error, '404': error, '503': error },
      },
    },
    '/api/cache': {
      delete: {
        summary: 'Purge a path or glob from both cache tiers of every instance',
        security: auth,
        parameters: [{ name: 'path', in: 'query', required: true, schema: { type: 'string' } }],
        responses: { '200': ok({ type: 'object' }), '400': error, '401': error },
      },
    },
  },
} as const
